"""The figures: ``sweep.png`` (:func:`plot_sweep`, test error against bit width) and
``compare.png`` (:func:`plot_compare`, test error per epoch per method). Matplotlib is imported
when a figure is drawn, with the Agg backend; each figure is written atomically."""

from __future__ import annotations

from pathlib import Path

from ..config import FLOAT_BITS
from ..files import save_figure
from .grid import CLASS_NAMES, CLASSES
from .records import Record, mean_std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(path: Path, fig, plt) -> None:
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, records: list[Record]) -> None:
    """Test error vs bit width: a line per norm/backend (and fixed widths), mean ± std."""
    plt = _pyplot()
    done = [r for r in records if r.status in ("trained", "finished")
            and r.final_test_error is not None]
    all_equal = all(len(set(r.widths)) == 1 for r in done)
    if any(r.varied for r in done):
        return _plot_one_at_a_time(path, done, plt)
    if all_equal:
        xc, xlabel, fixed = "w", "bit width (W = A = G = E)", []
    else:
        varying = [c for c in CLASSES if len({r.width(c) for r in done}) > 1] or ["e"]
        xc = varying[0]
        xlabel = f"bit width of {CLASS_NAMES[xc]} (bits_{xc})"
        fixed = [c for c in CLASSES if c != xc]
    xs = sorted({r.width(xc) for r in done})
    pos = {x: i + (0.5 if x == FLOAT_BITS and len(xs) > 1 else 0) for i, x in enumerate(xs)}

    def line_key(r):
        return (r.norm, r.backend, tuple(r.width(c) for c in fixed))

    lines: dict[tuple, dict[int, list[float]]] = {}
    float_points: dict[tuple, dict[int, list[float]]] = {}
    for r in done:
        target = float_points if r.backend == "float" else lines
        target.setdefault(line_key(r), {}).setdefault(r.width(xc), []).append(
            100 * r.final_test_error)
    # a float run belongs to every backend's line of its norm
    for (norm, _, fx), pts in float_points.items():
        owners = [k for k in lines if k[0] == norm and k[2] == fx]
        for k in owners or [(norm, "float", fx)]:
            for x, v in pts.items():
                lines.setdefault(k, {}).setdefault(x, []).extend(v)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, pts) in enumerate(sorted(lines.items())):
        norm, backend, fx = key
        xv = sorted(pts)
        stats = [mean_std(pts[x]) for x in xv]
        label = f"{norm.upper()}BN, {backend}" if norm != "none" else f"no BN, {backend}"
        if fx:
            label += " (" + ", ".join(f"{c.upper()}{v}" for c, v in zip(fixed, fx)) + ")"
        ax.errorbar([pos[x] for x in xv], [m for m, _ in stats], yerr=[s for _, s in stats],
                    marker="o", capsize=3, label=label, color=f"C{i % 10}")
    if xs:
        ax.set_xticks([pos[x] for x in xs])
        ax.set_xticklabels([f"{x}\nfloat" if x == FLOAT_BITS else str(x) for x in xs])
        if FLOAT_BITS in xs and len(xs) > 1:
            ax.axvline(pos[FLOAT_BITS] - 0.75, color="0.7", ls=":", lw=1)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center",
                transform=ax.transAxes)
    n_seeds = max((len(v) for pts in lines.values() for v in pts.values()), default=0)
    ax.set(xlabel=xlabel, ylabel="final test error (%)",
           title=f"test error vs bit width (mean ± std over {n_seeds} seed(s))")
    ax.grid(alpha=0.3)
    _save(path, fig, plt)


def _plot_one_at_a_time(path: Path, done: list[Record], plt) -> None:
    """A one-at-a-time sweep: a line per varied class (and norm/backend), mean ± std; the run
    with every class at the fixed width is a point of every line."""
    lines: dict[tuple, dict[int, list[float]]] = {}
    for r in done:
        classes = [r.varied] if r.varied else sorted({x.varied for x in done if x.varied})
        for c in classes:
            lines.setdefault((c, r.norm, r.backend), {}).setdefault(
                r.width(c), []).append(100 * r.final_test_error)
    fixed = [r for r in done if not r.varied]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = sorted({x for pts in lines.values() for x in pts})
    pos = {x: i for i, x in enumerate(xs)}
    for i, ((c, norm, backend), pts) in enumerate(sorted(lines.items(), key=lambda kv: (
            CLASSES.index(kv[0][0]), kv[0][1:]))):
        xv = sorted(pts)
        stats = [mean_std(pts[x]) for x in xv]
        label = f"{CLASS_NAMES[c]} ({c.upper()})"
        if len({(k[1], k[2]) for k in lines}) > 1:
            label += f", {norm.upper()}BN {backend}"
        ax.errorbar([pos[x] + 0.04 * (i - 1.5) for x in xv], [m for m, _ in stats],
                    yerr=[s for _, s in stats], marker="o", capsize=3, label=label,
                    color=f"C{i % 10}")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{x}\nfloat" if x == FLOAT_BITS else str(x) for x in xs])
    held = (f"the others at {fixed[0].bits_w} bits" if fixed
            else "the others at their fixed widths")
    n_seeds = max((len(v) for pts in lines.values() for v in pts.values()), default=0)
    ax.set(xlabel=f"bit width of one tensor class ({held})", ylabel="final test error (%)",
           title=f"test error vs bit width, one class at a time (mean ± std over {n_seeds} "
                 "seed(s))")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    _save(path, fig, plt)


def plot_compare(path: Path, results: list[dict], label: str | None) -> None:
    """Test error per epoch per method (mean over seeds, std band), as the paper's Fig. 1;
    ``results`` are the methods of ``compare.json``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for i, r in enumerate(results):
        if not r["curve_epochs"]:
            continue
        x = r["curve_epochs"]
        y = [100 * v for v in r["curve_test_error_mean"]]
        s = [100 * v for v in r["curve_test_error_std"]]
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, color=f"C{i}",
                label=f"{r['method']} ({r['seeds_done']} seed(s))")
        ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                        color=f"C{i}", alpha=0.15, lw=0)
        drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="test error (%)",
           title=f"test error per epoch{f' ({label})' if label else ''}, mean over seeds")
    ax.grid(alpha=0.3)
    _save(path, fig, plt)
