#!/usr/bin/env bash
# One call on a lent GPU machine: bench/gpu.py for a base commit ("before") and for this tree ("after"), on the same
# machine, results and logs into $OUT. Prepare here first (both folders are git-ignored and must be carried):
#
#     make gpu-prep BASE=<commit>      # .whl/ (the packages the GPU image lacks) and .before/ (BASE's tree)
#
# then the device tool: run(command="bash bench/device.sh", carry=[".whl", ".before"], timeout_s=600).
# Each bench gets BENCH_TIMEOUT seconds (default 270), so one that hangs leaves the other its time. BENCH_ARGS are
# passed to both benches, MODEL_FOLDER is where the "after" bench writes its model folder ("" skips that part).
# A smoke run on a CPU: BENCH_ARGS="--models tiny --device cpu --images 2 --n 2 --steps 2" MODEL_FOLDER="".
set -u
OUT=${OUT:-/tmp/ovdiff-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
limit=${BENCH_TIMEOUT:-270}
if [ -d .before ]; then
    (cd .before && PYTHONPATH=/tmp/site:$PWD timeout "$limit" python3 bench/gpu.py ${BENCH_ARGS:-} --out "$OUT/results-gpu-before.json") \
        >"$OUT/before.log" 2>&1
    echo "== before (exit $?)"; tail -n 25 "$OUT/before.log"
fi
folder=${MODEL_FOLDER-/tmp/ovdiff-model-folder}
PYTHONPATH=/tmp/site:$PWD timeout "$limit" python3 bench/gpu.py ${BENCH_ARGS:-} --out "$OUT/results-gpu.json" \
    ${folder:+--load-from-files "$folder"} >"$OUT/after.log" 2>&1
echo "== after (exit $?)"; tail -n 25 "$OUT/after.log"
