#!/usr/bin/env bash
# Issue 12's long check: the paper's Table II network (recipe lenet5-fmnist-paper: W8A8G8E8 on
# the int backend, int8 L1BN, 90 epochs, seed 0) trained twice, one run after the other, on a
# quiet machine (nothing else running; the default threads): with the integer GEMMs
# (int-gemm) and with QTRAIN_INT_GEMM=0 (float-gemm: the float32/float64 BLAS products the int
# backend used before issue 12; the same integers). Each resumes exactly when the script runs
# again. About 25 and 45 minutes on this project's 2-core machine.
#
#   scripts/gemm_speed.sh run                  # both runs, int-gemm first
#   scripts/gemm_speed.sh compare [RUN_DIR...]  # wall times, final errors, and whether the
#                                              # final checkpoints are equal bit for bit (more
#                                              # run directories of the same config may join)
#
# OUT (default runs/gemm) holds the run directories; results and the commands go to
# docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gemm}
phase=${1:?usage: scripts/gemm_speed.sh run | compare [RUN_DIR...]}
shift

finished() {  # finished DIR: the run in DIR did all its epochs
  [ -f "$1/summary.json" ] && python - "$1/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(0 if s["epochs_done"] >= s["epochs"] else 1)
PY
}

case "$phase" in
  run)
    mkdir -p "$OUT"
    for mode in int-gemm float-gemm; do
      dir=$OUT/$mode
      gemm=1; [ "$mode" = float-gemm ] && gemm=0
      if finished "$dir"; then
        echo "finished: $dir"
      elif [ -f "$dir/checkpoint.pt" ]; then
        QTRAIN_INT_GEMM=$gemm qtrain --resume "$dir"
      else
        QTRAIN_INT_GEMM=$gemm qtrain --recipe lenet5-fmnist-paper --seed 0 --out "$dir"
      fi
    done
    ;;
  compare)
    python scripts/same_weights.py "$OUT/int-gemm" "$OUT/float-gemm" "$@"
    ;;
  *)
    echo "gemm_speed.sh: unknown phase '$phase' (run or compare)" >&2
    exit 2
    ;;
esac
