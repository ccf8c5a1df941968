# Sourced by the GPU drivers (gpu_serving.sh, gpu_parallel.sh) with the bundle dir as $1: unpacks the
# SGLang bundle, installs this package's wheel and the benchmark client's extra wheels into the same
# site (pytest too where the machine lacks it), and points the CUDA extension's build at this checkout.
source "$1/setup_on_gpu.sh" "$1"
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/gpu-site}
python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$1"/sglang_oscar-*.whl \
  "$1"/extra/*.whl || { echo "wheel install failed"; exit 1; }
# the GPU tests need pytest; the bundle carries its wheels for a machine without it
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-deps --no-index --no-compile --target "$SITE" \
  "$1"/pytest/*.whl || { echo "pytest install failed"; exit 1; }
export SGLANG_OSCAR_SRC=$PWD SGLANG_OSCAR_BUILD_DIR=${SGLANG_OSCAR_BUILD_DIR:-${TMPDIR:-/tmp}/sglang_oscar_ext}
export PYTHONUNBUFFERED=1
