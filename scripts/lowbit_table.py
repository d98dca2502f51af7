"""The final test errors of scripts/lowbit.sh's variants as a markdown table (issue 11).

One row per variant and mode (``all``: every class at one width; ``class``: one class below 8
bits, the others at 8); one column per configuration; each cell the mean over the finished
seeds with the seeds' values in brackets. Unfinished runs are left out; a configuration with
no finished run is blank.

    python scripts/lowbit_table.py runs/lowbit
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"^l1-int-W(\d+)A(\d+)G(\d+)E(\d+)-s(\d+)$")
ALL = [(b, b, b, b) for b in (8, 6, 4)]
CLASS = [tuple(b if i == k else 8 for i in range(4)) for k in range(4) for b in (6, 4)]


def label(bits: tuple[int, ...]) -> str:
    if len(set(bits)) == 1:
        return f"all {bits[0]}"
    k = next(i for i, b in enumerate(bits) if b != 8)
    return f"{'WAGE'[k]}{bits[k]}"


def finished(out: Path) -> dict[tuple[str, tuple[int, ...]], dict[int, float]]:
    """(sweep directory name, widths) -> {seed: final test error in %}."""
    found: dict = {}
    for summary in sorted(out.glob("*/runs/*/summary.json")):
        m = NAME.match(summary.parent.name)
        s = json.loads(summary.read_text())
        if not m or s["epochs_done"] < s["epochs"]:
            continue
        *bits, seed = map(int, m.groups())
        key = (summary.parent.parent.parent.name, tuple(bits))
        found.setdefault(key, {})[seed] = 100 * s["final_test_error"]
    return found


def cell(errors: dict[int, float] | None) -> str:
    if not errors:
        return ""
    mean = sum(errors.values()) / len(errors)
    seeds = ", ".join(f"{errors[s]:.1f}" for s in sorted(errors))
    return f"{mean:.2f} ({seeds})"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "runs/lowbit")
    if not out.is_dir():
        print(f"lowbit_table: no directory {out}: run scripts/lowbit.sh first", file=sys.stderr)
        return 2
    found = finished(out)
    for mode, columns in (("all", ALL), ("class", CLASS)):
        sweeps = sorted({name for name, _ in found if name.startswith(mode + "-")})
        if not sweeps:
            continue
        print(f"| {mode} | " + " | ".join(label(c) for c in columns) + " |")
        print("|---|" + "--:|" * len(columns))
        for name in sweeps:
            row = [cell(found.get((name, c))) for c in columns]
            print(f"| {name[len(mode) + 1:]} | " + " | ".join(row) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
