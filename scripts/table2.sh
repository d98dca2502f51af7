#!/usr/bin/env bash
# The paper's Table II row on its own LeNet-5 (issue 10): long runs, meant for the background.
#
#   scripts/table2.sh wd           # 1. float L2BN, seed 0, weight decay 0 and 5e-4 (which helps?)
#   scripts/table2.sh row WD       # 2. int8 L1BN, float L1BN, float L2BN x seeds 0-2 at WD
#   scripts/table2.sh int16 WD     # 3. the same row's int run at 16 bits (W16A16G16E16), 3 seeds
#   scripts/table2.sh keep         # copy finished runs' config, summary and metrics to docs/runs/table2
#   scripts/table2.sh restore      # put them back under runs/ (a fresh checkout), so they are skipped
#
# Every phase is a `qtrain compare` into runs/table2/...: running the same command again skips
# the finished runs and resumes an interrupted one from its last checkpoint (bit-identical), so
# a killed or timed-out session just runs it again. JOBS runs side by side (default 2: the machine
# has 2 cores, one thread each); DEVICE=cuda trains the float runs on a GPU (the int runs stay on
# the CPU). Results and their commands go to docs/results.md. The float rows of `row 0` were
# trained on an H200 by scripts/cuda_check.sh and are kept in docs/runs/table2/row-wd-0-cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/table2}
JOBS=${JOBS:-2}
phase=${1:?usage: scripts/table2.sh wd | row WD | int16 WD | keep | restore}
KEPT=docs/runs/table2

case "$phase" in
  wd)
    for wd in 0 5e-4; do
      qtrain compare --recipe lenet5-fmnist-paper --methods float-l2 --seeds 1 --jobs "$JOBS" \
        --set weight_decay="$wd" --out "$OUT/wd-$wd"
    done
    ;;
  row)
    wd=${2:?the weight decay chosen in phase wd}
    qtrain compare --recipe lenet5-fmnist-paper --methods int,float-l1,float-l2 --seeds 3 \
      --jobs "$JOBS" --set weight_decay="$wd" ${DEVICE:+--device "$DEVICE"} \
      --out "$OUT/row-wd-$wd"
    ;;
  int16)
    wd=${2:?the weight decay chosen in phase wd}
    qtrain compare --recipe lenet5-fmnist-paper --methods int --bits 16 --seeds 3 --jobs "$JOBS" \
      --set weight_decay="$wd" --out "$OUT/int16-wd-$wd"
    ;;
  keep)  # finished runs only (summary.json with every epoch done)
    for run in "$OUT"/*/runs/*/; do
      run=${run%/}
      python - "$run/summary.json" <<'PY' || continue
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(1)
sys.exit(0 if s["epochs_done"] >= s["epochs"] else 1)
PY
      dest="$KEPT/$(basename "$(dirname "$(dirname "$run")")")/$(basename "$run")"
      mkdir -p "$dest"
      cp "$run/config.json" "$run/summary.json" "$run/metrics.jsonl" "$dest/"
      echo "kept $dest"
    done
    ;;
  restore)
    for kept in "$KEPT"/*/*/; do
      kept=${kept%/}
      dest="$OUT/$(basename "$(dirname "$kept")")/runs/$(basename "$kept")"
      [ -f "$dest/summary.json" ] && continue
      mkdir -p "$dest"
      cp "$kept"/* "$dest/"
      echo "restored $dest"
    done
    ;;
  *)
    echo "table2.sh: unknown phase '$phase' (wd, row, int16, keep or restore)" >&2
    exit 2
    ;;
esac
