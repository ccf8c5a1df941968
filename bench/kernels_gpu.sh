#!/usr/bin/env bash
# One call on a CUDA machine: build the extension against that machine's torch, run the kernel GPU tests
# (every kernel against its torch twin; log OUT/gpu_tests_kernels.txt), then the kernel benchmarks
# (bench/kernels.py, bench/extend.py; JSON + PNG into OUT). Needs torch and pytest only (no SGLang).
#   usage: bash bench/kernels_gpu.sh OUT [kernels.py flags]
set -uo pipefail
OUT=$1; shift
mkdir -p "$OUT"
exec > >(tee -a "$OUT/kernels_gpu.log") 2>&1
T0=$(date +%s)
export PYTHONUNBUFFERED=1 SGLANG_OSCAR_BUILD_DIR=${SGLANG_OSCAR_BUILD_DIR:-${TMPDIR:-/tmp}/sglang_oscar_ext}
if ! python3 -c "import pytest" 2>/dev/null && ls bundle/pytest/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target "${TMPDIR:-/tmp}/pytest-site" bundle/pytest/*.whl
  export PYTHONPATH="${TMPDIR:-/tmp}/pytest-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t=$(date +%s); python3 -c "from sglang_oscar import ops; ops.build()" > "$OUT/ext_build.txt" 2>&1
echo "ext build rc=$? in $(( $(date +%s) - t ))s"; tail -3 "$OUT/ext_build.txt"
t=$(date +%s)
timeout ${TESTS_S:-200} python3 -m pytest -q -rs -p no:cacheprovider ${TESTS:-tests/test_kernels_gpu.py tests/test_extend_gpu.py} \
  > "$OUT/gpu_tests_kernels.txt" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - t ))s"; tail -4 "$OUT/gpu_tests_kernels.txt"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests_kernels.txt" | head -20
if [ -z "${NO_BENCH:-}" ]; then
  t=$(date +%s); timeout ${BENCH_S:-240} python3 bench/kernels.py --out "$OUT" "$@"; echo "kernels.py rc=$? in $(( $(date +%s) - t ))s"
fi
echo "total $(( $(date +%s) - T0 ))s"
