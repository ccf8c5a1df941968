#!/usr/bin/env bash
# One call on a CUDA machine without network access: unpack the SGLang bundle (built beforehand with the
# gpu-sglang tool into BUNDLE, together with a wheel of this package and a tokenizer dir BUNDLE/tok), install
# the wheel into the same site, build the CUDA extension against that machine's torch, run the GPU tests of
# the backend and the kernels, then bench/gpu_serving.py.
#   usage: bash bench/gpu_serving.sh BUNDLE OUT [gpu_serving.py flags]
set -uo pipefail
B=$1; OUT=$2; shift 2
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_serving.log") 2>&1
T0=$(date +%s)
source "$B/setup_on_gpu.sh" "$B"
SITE=${GPU_SITE:-${TMPDIR:-/tmp}/gpu-site}
python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$B"/sglang_oscar-*.whl \
  || { echo "wheel install failed"; exit 1; }
export SGLANG_OSCAR_SRC=$PWD SGLANG_OSCAR_BUILD_DIR=${SGLANG_OSCAR_BUILD_DIR:-${TMPDIR:-/tmp}/sglang_oscar_ext}
export PYTHONUNBUFFERED=1
(cd "${TMPDIR:-/tmp}" && python3 -c "import sglang, sglang_oscar, importlib.metadata as m; print('sglang', sglang.__version__, '| sglang_oscar from', sglang_oscar.__file__); print('plugins:', [e.value for e in m.entry_points(group='sglang.srt.plugins')])")
echo "setup done in $(( $(date +%s) - T0 ))s"
# The extension (about a minute) builds while the checkpoints are written; the servers load it from the cache.
( t=$(date +%s); timeout 300 python3 -c "from sglang_oscar import ops; ops.build()" > "$OUT/ext_build.txt" 2>&1; \
  echo "ext build rc=$? in $(( $(date +%s) - t ))s" >> "$OUT/ext_build.txt"; \
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_backend_gpu.py tests/test_kernels_gpu.py \
    >> "$OUT/ext_build.txt" 2>&1; echo "gpu tests rc=$?" >> "$OUT/ext_build.txt" ) &
BUILD=$!
timeout ${BENCH_TIMEOUT:-560} python3 bench/gpu_serving.py --out "$OUT" --tokenizer "$B/tok" "$@"
echo "gpu_serving.py rc=$?"
wait $BUILD
tail -5 "$OUT/ext_build.txt"
echo "total $(( $(date +%s) - T0 ))s"
