#!/usr/bin/env bash
# WAGE 2-8-8-8 on the paper's LeNet-5 and Fashion-MNIST (issue 11): long runs, meant for the
# background. Each run resumes exactly from its checkpoint when the script runs again.
#
#   scripts/wage.sh nobn      # wage-2888 (WAGE's rules, no BN), seeds 0 and 1, side by side
#   scripts/wage.sh l1bn      # wage-2888-l1bn (the same with integer L1BN), seeds 0 and 1
#   scripts/wage.sh float     # the same network in float without BN, same epochs and milestones
#                             # (lr 0.01 / 10, momentum 0.9; lr 0.1 diverged without BN at
#                             # epoch 28-29 on both seeds), seeds 0 and 1
#   scripts/wage.sh long      # wage-2888 on WAGE's own MNIST schedule: 300 epochs, lr 8 / 8
#                             # after epochs 200 and 250 (wage-2888-e300-s0, -s1)
#   scripts/wage.sh float-long  # its float baseline on the same schedule: float without BN,
#                             # 300 epochs, lr 0.01 / 10 after 200 and 250 (float-nobn-e300-s0, -s1)
#   scripts/wage.sh keep      # copy finished runs' config, summary, metrics to docs/runs/wage
#
# OUT (default runs/wage) holds the run directories; results and their commands go to
# docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/wage}
phase=${1:?usage: scripts/wage.sh nobn | l1bn | float | long | float-long | keep}
mkdir -p "$OUT"

finished() {  # finished DIR: the run in DIR did all its epochs
  [ -f "$1/summary.json" ] && python - "$1/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(0 if s["epochs_done"] >= s["epochs"] else 1)
PY
}

run() {  # run DIR ARGS...: start, or resume an unfinished run, or skip a finished one
  local dir=$1; shift
  if finished "$dir"; then echo "finished: $dir"; return; fi
  if [ -f "$dir/checkpoint.pt" ]; then qtrain --resume "$dir"; else qtrain "$@" --out "$dir"; fi
}

pair() {  # pair NAME ARGS...: seeds 0 and 1 side by side in $OUT/NAME-s0, -s1 (logs beside)
  local name=$1 seed pid rc=0 pids=(); shift
  for seed in 0 1; do
    run "$OUT/$name-s$seed" "$@" --seed "$seed" > "$OUT/$name-s$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  return $rc
}

case "$phase" in
  long)
    pair wage-2888-e300 --recipe wage-2888 --epochs 300 --set lr_milestones=200,250
    ;;
  float-long)
    pair float-nobn-e300 --recipe lenet5-fmnist-paper --norm none --bits 32 --backend emulate \
      --lr 0.01 --epochs 300 --set lr_milestones=200,250
    ;;
  nobn|l1bn)
    recipe=wage-2888; [ "$phase" = l1bn ] && recipe=wage-2888-l1bn
    pair "$recipe" --recipe "$recipe"
    ;;
  float)
    pair float-nobn --recipe lenet5-fmnist-paper --norm none --bits 32 --backend emulate \
      --lr 0.01 --set lr_milestones=60,75
    ;;
  keep)
    for dir in "$OUT"/*/; do  # (the logs beside them stay)
      dir=${dir%/}
      finished "$dir" || continue
      mkdir -p "docs/runs/wage/$(basename "$dir")"
      cp "$dir/config.json" "$dir/summary.json" "$dir/metrics.jsonl" "docs/runs/wage/$(basename "$dir")/"
      echo "kept docs/runs/wage/$(basename "$dir")"
    done
    ;;
  *)
    echo "wage.sh: unknown phase '$phase' (nobn, l1bn, float, long, float-long or keep)" >&2
    exit 2
    ;;
esac
