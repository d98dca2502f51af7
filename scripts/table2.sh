#!/usr/bin/env bash
# The paper's Table II row on its own LeNet-5 (issue 10): long runs, meant for the background.
#
#   scripts/table2.sh wd           # 1. float L2BN, seed 0, weight decay 0 and 5e-4 (which helps?)
#   scripts/table2.sh row WD       # 2. int8 L1BN, float L1BN, float L2BN x seeds 0-2 at WD
#                                  #    (the int8 runs round the norms' errors to nearest)
#   scripts/table2.sh int16 WD     # 3. the same row's int run at 16 bits (W16A16G16E16), 3 seeds
#   scripts/table2.sh int8 WD      # 4. int8 L1BN with the recipe's norm_errors = "stochastic"
#   scripts/table2.sh final WD     # 5. the row of 4 beside the float runs of 2 (trains nothing)
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
phase=${1:?usage: scripts/table2.sh wd | row WD | int16 WD | int8 WD | final WD | keep | restore}
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
    # made before the recipe set norm_errors = "stochastic": these int8 runs round to nearest
    qtrain compare --recipe lenet5-fmnist-paper --methods int,float-l1,float-l2 --seeds 3 \
      --jobs "$JOBS" --set weight_decay="$wd" --set norm_errors=nearest \
      ${DEVICE:+--device "$DEVICE"} --out "$OUT/row-wd-$wd"
    ;;
  int16)  # norm_errors acts below 16 bits only; these runs predate the field
    wd=${2:?the weight decay chosen in phase wd}
    qtrain compare --recipe lenet5-fmnist-paper --methods int --bits 16 --seeds 3 --jobs "$JOBS" \
      --set weight_decay="$wd" --set norm_errors=nearest --out "$OUT/int16-wd-$wd"
    ;;
  int8)  # three runs side by side: one thread each on the 2 cores, about 40 s an epoch
    wd=${2:?the weight decay chosen in phase wd}
    qtrain compare --recipe lenet5-fmnist-paper --methods int --seeds 3 --jobs "${JOBS_INT8:-3}" \
      --set weight_decay="$wd" --out "$OUT/int8-nsr-wd-$wd"
    ;;
  final)  # phase 4's int8 runs and phase 2's float runs (kept), linked into one comparison
    wd=${2:?the weight decay chosen in phase wd}
    dest="$OUT/final-wd-$wd/runs"
    mkdir -p "$dest"
    for run in "$OUT/int8-nsr-wd-$wd"/runs/int8-L1BN-s* "$KEPT/row-wd-$wd-cuda"/float-L*; do
      ln -sfn "$(realpath "$run")" "$dest/$(basename "$run")"
    done
    qtrain compare --recipe lenet5-fmnist-paper --methods int,float-l1,float-l2 --seeds 3 \
      --set weight_decay="$wd" --out "$OUT/final-wd-$wd"
    ;;
  keep)  # finished runs only (summary.json with every epoch done)
    for run in "$OUT"/*/runs/*/; do
      run=${run%/}
      [ -L "$run" ] && continue  # phase final's links: kept where they came from
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
    echo "table2.sh: unknown phase '$phase' (wd, row, int16, int8, final, keep or restore)" >&2
    exit 2
    ;;
esac
