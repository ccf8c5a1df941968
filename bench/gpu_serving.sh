#!/usr/bin/env bash
# One call on a CUDA machine without network access: unpack the SGLang bundle (built beforehand with the
# gpu-sglang tool into BUNDLE, together with a wheel of this package, a tokenizer dir BUNDLE/tok and the
# wheels of SGLang's benchmark client's extra imports in BUNDLE/extra: datasets, multiprocess), install them
# into the same site, build the CUDA extension against that machine's torch, run the GPU tests of the
# backend and the kernels (log: OUT/gpu_tests.txt), then bench/gpu_serving.py; a short summary comes last.
#   usage: bash bench/gpu_serving.sh BUNDLE OUT [gpu_serving.py flags]
set -uo pipefail
B=$1; OUT=$2; shift 2
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_serving.log") 2>&1
T0=$(date +%s)
LIMIT=${BENCH_TOTAL_S:-555}   # the whole call, setup included
source bench/gpu_site.sh "$B"
(cd "${TMPDIR:-/tmp}" && python3 -c "import sglang, sglang_oscar, importlib.metadata as m; print('sglang', sglang.__version__, '| sglang_oscar from', sglang_oscar.__file__); print('plugins:', [e.value for e in m.entry_points(group='sglang.srt.plugins')])")
# SGLang's client imports datasets (pyarrow, fsspec, dill from the machine or the bundle): fail loudly here.
(cd "${TMPDIR:-/tmp}" && python3 -c "import sglang.benchmark.serving, datasets, pyarrow, fsspec; print('bench_serving ok: datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__)" 2>&1 | grep -v Warning | tail -3)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "setup done in $(( $(date +%s) - T0 ))s"
# The extension (about a minute) builds while the checkpoint is written and the servers start; the GPU tests
# follow, and the bench waits for them (OUT/.tests_done, at most 90 s) before it measures anything.
rm -f "$OUT/.tests_done"
( t=$(date +%s); timeout 300 python3 -c "from sglang_oscar import ops; ops.build()" > "$OUT/ext_build.txt" 2>&1; \
  echo "ext build rc=$? in $(( $(date +%s) - t ))s" >> "$OUT/ext_build.txt"; \
  timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_backend_gpu.py tests/test_kernels_gpu.py \
    tests/test_extend_gpu.py tests/test_decode_plan.py tests/test_flash.py \
    > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"; touch "$OUT/.tests_done" ) &
BUILD=$!
LEFT=$(( LIMIT - ($(date +%s) - T0) ))
timeout $(( LEFT - 5 )) python3 bench/gpu_serving.py --out "$OUT" --tokenizer "$B/tok" --deadline-s $(( LEFT - 20 )) \
  --quiet-file "$OUT/.tests_done" "$@"
echo "gpu_serving.py rc=$?"
wait $BUILD
rm -f "$OUT/.tests_done"
tail -2 "$OUT/ext_build.txt"; tail -3 "$OUT/gpu_tests.txt"
cat "$OUT/summary.txt" 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s"
