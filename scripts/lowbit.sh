#!/usr/bin/env bash
# Below 8 bits (issue 11 item 3): which rule buys how much, on the sweep's short schedule
# (small LeNet-5, L1BN, int backend, 2,000 images per class, 6 epochs, lr /10 after epoch 4).
#
#   scripts/lowbit.sh all [VARIANT...]     # every class at 4 and 6 bits (and 8), 2 seeds
#   scripts/lowbit.sh class [VARIANT...]   # one class at a time at 2, 4, 6 bits, the rest at 8
#   scripts/lowbit.sh widths               # the bit-width sweep (2..32, 3 seeds) with the
#                                          # lenet5-fmnist-lowbit recipe's rules (= variant all)
#   scripts/lowbit.sh widths-old           # the same sweep with the default recipe's rules
#   scripts/lowbit.sh plot                 # both curves -> docs/img/sweep-lowbit.png, and the
#                                          # sweeps' JSON -> docs/runs/lowbit
#   scripts/lowbit.sh table                # the final errors of every finished variant
#
# A variant is a set of recipe fields (VARIANTS below); without names, every variant runs.
# Each is a `qtrain sweep` into runs/lowbit/<mode>-<variant>: running it again skips the
# finished runs. JOBS runs side by side (default 1; the machine has 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/lowbit}
JOBS=${JOBS:-1}
SEEDS=${SEEDS:-2}
SCHEDULE=(--set per_class=2000 --set epochs=6 --set lr_milestones=4)

SR=stochastic_errors=true        # errors stochastic (not the norm's)
NSR=norm_errors=stochastic       # the error a norm hands back stochastic
MEAN=weight_exp=mean             # weights' exponent from their mean magnitude
U=act_codes=unsigned             # activations after a ReLU as unsigned codes
CH=norm_input_exp=channel        # a norm's input with one exponent per channel
declare -A VARIANTS=(
  [base]=""                      # errors to nearest (the old default)
  [sr]="$SR"
  [nsr]="$NSR"
  [sr-nsr]="$SR $NSR"
  [sr-nsr-mean]="$SR $NSR $MEAN"
  [sample]="error_exp=sample"    # one error exponent per sample (nearest)
  [sr-nsr-u]="$SR $NSR $U"
  [sr-nsr-mean-u]="$SR $NSR $MEAN $U"
  # every rule that helps, and each left out in turn
  [all]="$SR $NSR $MEAN $U $CH"
  [all-no-sr]="$NSR $MEAN $U $CH"
  [all-no-nsr]="$SR $MEAN $U $CH"
  [all-no-mean]="$SR $NSR $U $CH"
  [all-no-u]="$SR $NSR $MEAN $CH"
)
ORDER=(base sr nsr sr-nsr sr-nsr-mean sample sr-nsr-u sr-nsr-mean-u all all-no-sr all-no-nsr
       all-no-mean all-no-u)

sets() {  # sets VARIANT: the --set arguments of a variant
  local kv
  for kv in ${VARIANTS[$1]}; do printf -- '--set\n%s\n' "$kv"; done
}

mode=${1:?usage: scripts/lowbit.sh all|class [VARIANT...] | widths | widths-old | plot | table}
shift
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for v in "${names[@]}"; do
  if [ -z "${VARIANTS[$v]+set}" ]; then
    echo "lowbit.sh: unknown variant '$v' (${ORDER[*]})" >&2
    exit 2
  fi
done

case "$mode" in
  all)
    for v in "${names[@]}"; do
      mapfile -t extra < <(sets "$v")
      qtrain sweep --bits 4,6,8 --norm l1 --seeds "$SEEDS" --jobs "$JOBS" "${SCHEDULE[@]}" \
        "${extra[@]}" --out "$OUT/all-$v"
    done
    ;;
  class)
    for v in "${names[@]}"; do
      mapfile -t extra < <(sets "$v")
      qtrain sweep --one-at-a-time --bits 8 --bits-w 2,4,6 --bits-a 2,4,6 --bits-g 2,4,6 \
        --bits-e 2,4,6 --norm l1 --seeds "$SEEDS" --jobs "$JOBS" "${SCHEDULE[@]}" "${extra[@]}" \
        --out "$OUT/class-$v"
    done
    ;;
  widths)  # 16 bits cannot hold unsigned activations (17-bit codes): the curve skips it
    qtrain sweep --recipe lenet5-fmnist-lowbit --bits 2,3,4,6,8,12,32 --norm l1 --seeds 3 \
      --jobs "$JOBS" "${SCHEDULE[@]}" --out "$OUT/widths"
    ;;
  widths-old)
    qtrain sweep --bits 2,3,4,6,8,12,16,32 --norm l1 --seeds 3 --jobs "$JOBS" "${SCHEDULE[@]}" \
      --out "$OUT/widths-old"
    ;;
  plot)
    mkdir -p docs/runs/lowbit
    for sweep in widths widths-old; do
      cp "$OUT/$sweep/sweep.json" "docs/runs/lowbit/$sweep.json"
    done
    python scripts/lowbit_table.py --plot docs/img/sweep-lowbit.png \
      docs/runs/lowbit/widths-old.json docs/runs/lowbit/widths.json
    ;;
  table)
    python scripts/lowbit_table.py "$OUT"
    ;;
  *)
    echo "lowbit.sh: unknown mode '$mode' (all, class, widths, widths-old, plot or table)" >&2
    exit 2
    ;;
esac
