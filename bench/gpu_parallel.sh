#!/usr/bin/env bash
# One call on a machine with two CUDA GPUs and no network: the SGLang bundle (as for gpu_serving.sh:
# BUNDLE with the package wheel, BUNDLE/tok, BUNDLE/extra), the CUDA extension built once before any
# server starts, then bench/gpu_parallel.py (TP=1 vs TP=2, DP=2); a short summary comes last.
#   usage: bash bench/gpu_parallel.sh BUNDLE OUT [gpu_parallel.py flags]
set -uo pipefail
B=$1; OUT=$2; shift 2
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_parallel.log") 2>&1
T0=$(date +%s)
LIMIT=${BENCH_TOTAL_S:-570}
source bench/gpu_site.sh "$B"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
rm -f "$OUT/.built"
( t=$(date +%s); timeout 300 python3 -c "from sglang_oscar import ops; ops.build()" > "$OUT/ext_build.txt" 2>&1; \
  echo "ext build rc=$? in $(( $(date +%s) - t ))s" >> "$OUT/ext_build.txt"; touch "$OUT/.built" ) &
LEFT=$(( LIMIT - ($(date +%s) - T0) ))
timeout $(( LEFT - 5 )) python3 bench/gpu_parallel.py --out "$OUT" --tokenizer "$B/tok" --deadline-s $(( LEFT - 20 )) \
  --wait-file "$OUT/.built" "$@"
echo "gpu_parallel.py rc=$?"
wait
rm -f "$OUT/.built"
tail -1 "$OUT/ext_build.txt"
echo "total $(( $(date +%s) - T0 ))s"
