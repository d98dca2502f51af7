#!/usr/bin/env python
"""Where the int8 row of Table II loses to float (issue 10): the kept runs' test error per
epoch, int8 L1BN against the same network at 16 bits and the float rows, as a table of
means over seeds and epoch ranges (markdown on stdout) and a plot.

    python scripts/table2_widths.py                         # docs/runs/table2 -> docs/img/table2-widths.png
    python scripts/table2_widths.py --runs runs/table2 --png /tmp/widths.png

Each method's runs are ``<runs>/<row>/<method>-s<seed>/metrics.jsonl`` (``scripts/table2.sh
keep`` lays them out so); a method with unfinished runs is compared over the epochs all its
runs reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METHODS = (  # label, folder under --runs, run-name prefix
    ("int8 L1BN, W8A8G8E8, stochastic norm errors", "int8-nsr-wd-0", "int8-L1BN"),
    ("int8 L1BN, W8A8G8E8, nearest norm errors", "row-wd-0", "int8-L1BN"),
    ("int16 L1BN, W16A16G16E16", "int16-wd-0", "int16-L1BN"),
    ("float L1BN", "row-wd-0-cuda", "float-L1BN"),
    ("float L2BN", "row-wd-0-cuda", "float-L2BN"),
)
RANGES = ((21, 30), (31, 40), (51, 60), (61, 70), (81, 90))


def curves(runs: Path, folder: str, prefix: str) -> list[list[float]]:
    out = []
    for path in sorted((runs / folder).glob(f"{prefix}-s*/metrics.jsonl")):
        out.append([100 * json.loads(line)["test_error"] for line in path.read_text().splitlines()])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("docs/runs/table2"))
    ap.add_argument("--png", type=Path, default=Path("docs/img/table2-widths.png"))
    args = ap.parse_args()
    data = {label: curves(args.runs, folder, prefix) for label, folder, prefix in METHODS}
    data = {k: v for k, v in data.items() if v}
    print("| method | seeds | epochs | " + " | ".join(f"{a}-{b}" for a, b in RANGES)
          + " | final (per seed) |")
    print("|---|--:|--:|" + "--:|" * len(RANGES) + "---|")
    for label, runs in data.items():
        n = min(len(r) for r in runs)
        cells = []
        for a, b in RANGES:
            cells.append(f"{statistics.mean(v for r in runs for v in r[a - 1:b]):.2f}"
                         if b <= n else "")
        finals = ", ".join(f"{r[-1]:.2f}" for r in runs) if n == 90 else ""
        print(f"| {label} | {len(runs)} | {n} | " + " | ".join(cells) + f" | {finals} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in data.items():
        n = min(len(r) for r in runs)
        mean = [statistics.mean(r[e] for r in runs) for e in range(n)]
        ax.plot(range(1, n + 1), mean, label=f"{label} ({len(runs)} seeds)")
    ax.set(xlabel="epoch", ylabel="test error, % (mean over seeds)", ylim=(6.5, 12),
           title="lenet5-paper on Fashion-MNIST: 8 vs 16 bits vs float")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"\nplot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
