"""The final test errors of scripts/lowbit.sh's variants as a markdown table (issue 11).

One row per variant and mode (``all``: every class at one width; ``class``: one class below 8
bits, the others at 8); one column per configuration; each cell the mean over the finished
seeds with the seeds' values in brackets. Unfinished runs are left out; a configuration with
no finished run is blank.

    python scripts/lowbit_table.py runs/lowbit

With ``--plot OUT OLD.json NEW.json``: test error against bit width of two sweeps (``qtrain
sweep``'s sweep.json; all classes at one width), mean and standard deviation over seeds, the
old rules beside the new, written to OUT.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"^l1-int-W(\d+)A(\d+)G(\d+)E(\d+)-s(\d+)$")
ALL = [(b, b, b, b) for b in (8, 6, 4)]
CLASS = [tuple(b if i == k else 8 for i in range(4)) for k in range(4) for b in (6, 4, 2)]


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


def plot(path: Path, sweeps: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qtrain.files import save_figure

    labels = ["the default recipe's rules", "lenet5-fmnist-lowbit's rules"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    widths: set[int] = set()
    for i, sweep in enumerate(sweeps):
        per_width: dict[int, list[float]] = {}
        for r in json.loads(sweep.read_text()):
            if r["final_test_error"] is not None:
                per_width.setdefault(r["bits_w"], []).append(100 * r["final_test_error"])
        xs = sorted(per_width)
        widths |= set(xs)
        ax.errorbar([str(x) if x < 32 else "32\nfloat" for x in xs],
                    [np.mean(per_width[x]) for x in xs],
                    yerr=[np.std(per_width[x], ddof=1) if len(per_width[x]) > 1 else 0
                          for x in xs],
                    marker="o", capsize=3, label=f"{labels[i % 2]} ({sweep.stem})")
    ax.set_yscale("log")
    ax.set(xlabel="bit width (W = A = G = E)", ylabel="final test error (%, log scale)",
           title="small LeNet-5, L1BN, int backend: mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--plot"]:
        plot(Path(argv[1]), [Path(a) for a in argv[2:]])
        return 0
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
