#!/usr/bin/env bash
# One pass of the checks that need a CUDA device (CI has none), sized for a short GPU lease:
#
#   QTRAIN_DATA=DIR OUT=DIR scripts/cuda_check.sh [SECONDS]
#
# 1. In the background, the float baselines of Table II on the paper's LeNet-5 (issue 10):
#    `qtrain compare --methods float-l1,float-l2 --seeds 3 --device cuda` (float32 networks,
#    bits 32), six runs side by side, into $OUT/runs/table2-cuda/row-wd-0. They stop at the deadline;
#    an unfinished run resumes anywhere from its checkpoint (`scripts/table2.sh` on the CPU).
# 2. Meanwhile tests/qtrain/test_cuda.py: emulate on the GPU equals int on the CPU bit for bit
#    (three steps of six configurations and the golden 20-step checksum), the float baselines,
#    and the command line on the GPU.
# 3. If time is left, bench/bench_train.py --device cuda (emulate vs float on the GPU), alone.
# 4. Packs what came out into $OUT: check.tgz (logs, test results, bench JSON, the runs'
#    config/summary/metrics/curves) and one ckpt-<run>.tar per unfinished run.
#
# SECONDS (default 540) is the whole budget; the script ends inside it. STEPS (default
# tests,table,bench) picks the parts; the table resumes runs already in $OUT/runs/table2-cuda.
set -u
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
START=$(date +%s)
OUT=${OUT:?set OUT to the output directory}
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba-cache PYTHONPATH=$PWD
STEPS=,${STEPS:-tests,table,bench},
want() { [[ $STEPS == *,$1,* ]]; }
left() { echo $((START + BUDGET - $(date +%s))); }

mkdir -p "$OUT/logs"
{
  nvidia-smi -L
  python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0)); print('numba', numba.__version__, \
'numpy', numpy.__version__)"
  nproc
} > "$OUT/logs/machine.txt" 2>&1

RUNS=$OUT/runs/table2-cuda/row-wd-0
TABLE=
if want table; then
  setsid python3 -m qtrain compare --recipe lenet5-fmnist-paper --methods float-l1,float-l2 \
    --seeds 3 --jobs 6 --set weight_decay=0 --device cuda --out "$RUNS" \
    > "$OUT/logs/table2.log" 2>&1 &
  TABLE=$!
fi

if want tests; then
  python3 -m pytest tests/qtrain/test_cuda.py -v -rs -p no:cacheprovider \
    > "$OUT/logs/pytest.log" 2>&1
  echo "pytest exit $?" >> "$OUT/logs/pytest.log"
fi

# the table runs until done, or until 110 s before the end (packing and the bench's turn)
while [ -n "$TABLE" ] && kill -0 "$TABLE" 2>/dev/null && [ "$(left)" -gt 110 ]; do sleep 5; done
if [ -n "$TABLE" ] && kill -0 "$TABLE" 2>/dev/null; then
  kill -TERM -- -"$TABLE" 2>/dev/null; sleep 5; kill -KILL -- -"$TABLE" 2>/dev/null
  echo "stopped at the deadline" >> "$OUT/logs/table2.log"
fi

if want bench && [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 40 )) python3 bench/bench_train.py --device cuda \
    --methods emulate,float --warmup 5 --rounds 4 --steps 20 --json \
    > "$OUT/logs/bench_cuda.json" 2> "$OUT/logs/bench_cuda.log"
fi

# pack: small files of every run; checkpoints of unfinished runs, one tar each
(cd "$OUT" && mkdir -p runs && find runs -name '*.json' -o -name '*.jsonl' -o -name '*.png' -o -name '*.log' \
   -o -name '*.csv' | tar czf check.tgz logs -T -)
for run in "$RUNS"/runs/*/; do
  [ -d "$run" ] || continue
  python3 - "$run/summary.json" <<'PY' && continue
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(1)
sys.exit(0 if s["epochs_done"] >= s["epochs"] else 1)
PY
  name=$(basename "$run")
  (cd "$OUT" && tar cf "ckpt-$name.tar" --exclude='*.png' "${run#"$OUT"/}")
done
rm -rf "$OUT/runs" "$OUT/logs"
ls -la "$OUT"
