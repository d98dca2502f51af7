r"""Model-level analyses: ``qtrain ops`` (BN operation counts and Table IV cost) and
``qtrain stats`` (sigma_L2 / sigma_L1 of a trained network, the paper's Fig. 3).

The CLI wires two subcommands to the pairs below; each ``run_*`` prints to stdout, returns the
exit status and raises :class:`qtrain.config.UserError` (one line) for user errors:

* :func:`add_ops_arguments` / :func:`run_ops` --
  ``qtrain ops SHAPE... | --model M [--batch B] [--eps-log2 E] [--json]``.
  With shapes: one :func:`qkernels.opcount.bn_report` per shape (the original behaviour, JSON a
  list of reports). With ``--model``: the model (float, norm l1) runs once on a zero batch of
  ``B`` images; a forward hook on every :class:`~qtrain.nn.L1BatchNorm1d` /
  :class:`~qtrain.nn.L1BatchNorm2d` records its input shape; each layer gets a ``bn_report``
  and the model a total (:func:`model_ops`).
* :func:`add_stats_arguments` / :func:`run_stats` -- ``qtrain stats RUN_DIR [--batches K]
  [--batch-size B] [--out FILE]``: the run's checkpoint in eval mode on ``K`` test batches,
  forward pre-hooks record each BN layer's input, and :func:`bn_sigma_ratios` gives per layer
  and channel

  .. math::

      \sigma_{L_2} = \sqrt{\tfrac1m \textstyle\sum (x_i-\mu)^2}, \qquad
      \sigma_{L_1} = \tfrac1m \textstyle\sum |x_i-\mu|, \qquad
      r = \sigma_{L_2} / \sigma_{L_1}

  per batch (population statistics over the channel's N*H*W values, as
  :func:`qtrain.reference.sigma_ratio`), averaged over the batches. Theorem 1: for Gaussian
  inputs r = sqrt(pi/2) = 1.2533; r >= 1 for any data (Jensen).

Totals of ``ops`` (``model_ops``): counts are summed over layers; time and energy of the total
are the estimate of the summed counts, which equals the sum of the layers' estimates (both are
linear in the counts); area is that of the summed counts, i.e. one unit of every op type used
(the layers share the units), *not* the sum of the layers' areas.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .config import MODELS, UserError

#: Theorem 1: sigma_L2 / sigma_L1 of a Gaussian.
SQRT_PI_2 = math.sqrt(math.pi / 2)
#: The whole-model L1BN-vs-L2BN savings the paper reports (Section V-D).
PAPER_SAVING = {"time": 0.25, "energy": 0.37}
#: Network input (without the batch dimension) of each model in ``qtrain ops --model``.
MODEL_INPUT = {"lenet5": (1, 28, 28), "lenet5-paper": (1, 28, 28), "mlp": (784,),
               "vgg7": (3, 32, 32), "resnet20": (3, 32, 32)}
DEFAULT_BATCH = 128
DEFAULT_STATS_BATCHES = 10
DEFAULT_STATS_BATCH_SIZE = 128
#: Report keys of :func:`qkernels.opcount.bn_report` with forward/backward/total counts.
_SPLIT_KEYS = ("l1bn_kernel", "l2bn_reference")
_TOTAL_KEYS = ("l1bn_table4", "l2bn_table4")
_LABELS = {"l1bn_kernel": "L1BN int8 kernel", "l2bn_reference": "L2BN reference",
           "l1bn_table4": "L1BN Table IV", "l2bn_table4": "L2BN Table IV"}


# ============================================================================================
# ops
# ============================================================================================

def parse_shape(text: str) -> tuple[int, ...]:
    """``"128x6x24x24"`` -> ``(128, 6, 24, 24)``; NxC or NxCxHxW, positive (argparse type)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not like 128x6x24x24 or 128x120") from None
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be NxC or NxCxHxW, positive")
    return shape


def add_ops_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``SHAPE...`` or ``--model M [--batch B]``, plus ``--eps-log2`` and ``--json``."""
    parser.add_argument("shapes", nargs="*", type=parse_shape, metavar="SHAPE",
                        help="BN input shape NxCxHxW or NxC, e.g. 128x6x24x24 (or use --model)")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="count every BN layer of this model (instead of SHAPEs)")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help=f"batch size with --model (default {DEFAULT_BATCH})")
    parser.add_argument("--eps-log2", type=int, default=None,
                        help="int8 L1BN epsilon = 2**EPS_LOG2 (default: none for SHAPEs; each "
                             "layer's own epsilon, 2**-17 for eps=1e-5, with --model)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def bn_input_shapes(model_name: str, batch: int = DEFAULT_BATCH,
                    probe_batch: int | None = None) -> list[dict]:
    """``[{"name", "shape", "eps"}]`` of every L1 batch norm of ``model_name`` (float, norm l1)
    in forward order, recorded by forward hooks on one zero batch of ``batch`` inputs.

    With ``probe_batch`` the model runs on ``probe_batch`` inputs instead and the recorded
    batch dimension (which must equal ``probe_batch``: every BN input of these models is
    (N, C[, H, W])) is replaced by ``batch``: the same shapes without a large forward pass.
    """
    import torch

    from .models import build
    from .nn import L1BatchNorm1d, L1BatchNorm2d

    if model_name not in MODEL_INPUT:
        raise UserError(f"unknown model {model_name!r}: choose one of {', '.join(MODEL_INPUT)}")
    torch.manual_seed(0)
    model = build(model_name, "l1", None)
    seen: list[dict] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (L1BatchNorm1d, L1BatchNorm2d)):
            def hook(mod, inputs, output, name=name):
                seen.append({"name": name, "shape": [int(s) for s in inputs[0].shape],
                             "eps": float(mod.eps)})
            handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((probe_batch or batch, *MODEL_INPUT[model_name])))
    finally:
        for h in handles:
            h.remove()
    if probe_batch:
        for rec in seen:
            if rec["shape"][0] != probe_batch:
                raise RuntimeError(f"{model_name} layer {rec['name']}: BN input "
                                   f"{rec['shape']} is not batch-first")
            rec["shape"][0] = batch
    return seen


def _sum_counts(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for op, n in d.items():
            out[op] = out.get(op, 0) + int(n)
    return out


def _saving(l1: dict, l2: dict) -> dict:
    """Fraction of L2BN's time, energy and area that L1BN saves (1 - L1/L2)."""
    return {k: (1.0 - l1[v] / l2[v]) if l2[v] else 0.0
            for k, v in (("time", "time_ns"), ("energy", "energy_pJ"), ("area", "area_um2"))}


def total_report(reports: list[dict]) -> dict:
    """Counts of ``bn_report`` results summed over layers, their ASIC estimates and savings.

    Returns ``{"counts": {key: ...}, "asic": {dtype: {key: est, "saving": {...}}},
    "saving": {dtype: {"kernel_vs_reference", "table4"}}}`` where ``counts`` has the keys of
    a ``bn_report`` (``l1bn_kernel`` and ``l2bn_reference`` with forward/backward/total).
    """
    from qkernels.opcount import asic_estimate

    counts: dict = {}
    for key in _SPLIT_KEYS:
        counts[key] = {part: _sum_counts([r["counts"][key][part] for r in reports])
                       for part in ("forward", "backward", "total")}
    for key in _TOTAL_KEYS:
        counts[key] = _sum_counts([r["counts"][key] for r in reports])
    asic: dict = {}
    for dtype in ("int8", "float32"):
        est = {key: asic_estimate(counts[key]["total"] if key in _SPLIT_KEYS else counts[key],
                                  dtype) for key in (*_SPLIT_KEYS, *_TOTAL_KEYS)}
        est["saving"] = {
            "kernel_vs_reference": _saving(est["l1bn_kernel"], est["l2bn_reference"]),
            "table4": _saving(est["l1bn_table4"], est["l2bn_table4"]),
        }
        asic[dtype] = est
    return {"counts": counts, "asic": asic,
            "saving": {dtype: asic[dtype]["saving"] for dtype in asic}}


def model_ops(model_name: str, batch: int = DEFAULT_BATCH, eps_log2: int | None = None) -> dict:
    """Per-BN-layer ``bn_report`` and the model's total (see the module docstring).

    ``eps_log2`` None: each layer's own epsilon as the kernels round it (nearest power of two).
    """
    from qkernels.opcount import bn_report

    from .nn import _eps_log2

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise UserError(f"--batch {batch} must be at least 2 (a BN needs more than one value "
                        "per channel)")
    layers = []
    # hooked at batch 2 and scaled: equal to hooking at ``batch`` (tested), and cheap for any B
    for rec in bn_input_shapes(model_name, batch, probe_batch=2):
        eps = _eps_log2(rec["eps"]) if eps_log2 is None else eps_log2
        try:
            report = bn_report(tuple(rec["shape"]), eps_log2=eps)
        except ValueError as err:
            raise UserError(f"{model_name} layer {rec['name']} at --batch {batch}: "
                            f"{str(err).splitlines()[0]}") from None
        layers.append({"name": rec["name"], "shape": rec["shape"], "report": report})
    if not layers:
        raise UserError(f"model {model_name} has no L1 batch norm layers")
    return {"model": model_name, "batch": batch, "input": list(MODEL_INPUT[model_name]),
            "layers": layers, "total": total_report([l["report"] for l in layers]),
            "paper_saving": PAPER_SAVING}


def model_markdown(result: dict) -> str:
    """Markdown tables of :func:`model_ops`: layers, per-layer tables, totals, savings."""
    from qkernels.opcount import OPS, markdown_tables

    lines = [f"# {result['model']}, batch {result['batch']}: "
             f"{len(result['layers'])} BN layers", "",
             "| layer | BN input shape | m | c | eps_log2 |", "|---|---|--:|--:|--:|"]
    for layer in result["layers"]:
        r = layer["report"]
        lines.append(f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {r['m']} | "
                     f"{r['c']} | {r['eps_log2']} |")
    lines += ["", "## Per layer", "", markdown_tables([l["report"] for l in result["layers"]]),
              "", "## Total over layers", "",
              "| counted | " + " | ".join(OPS) + " |", "|---|" + "--:|" * len(OPS)]
    tot = result["total"]
    for key, label in _LABELS.items():
        c = tot["counts"][key]
        c = c["total"] if key in _SPLIT_KEYS else c
        lines.append(f"| {label} | " + " | ".join(str(c[op]) for op in OPS) + " |")
    lines += ["", "| dtype | counted | time (us) | energy (nJ) | area (um^2) |",
              "|---|---|--:|--:|--:|"]
    for dtype in ("int8", "float32"):
        for key, label in _LABELS.items():
            e = tot["asic"][dtype][key]
            lines.append(f"| {dtype} | {label} | {e['time_ns'] / 1e3:.1f} | "
                         f"{e['energy_pJ'] / 1e3:.2f} | {e['area_um2']:.0f} |")
    lines += ["", "| dtype | L1BN vs L2BN saving | time | energy | area |",
              "|---|---|--:|--:|--:|"]
    for dtype in ("int8", "float32"):
        for key, label in (("kernel_vs_reference", "kernel vs reference"),
                           ("table4", "Table IV formulas")):
            s = tot["saving"][dtype][key]
            lines.append(f"| {dtype} | {label} | {s['time']:.1%} | {s['energy']:.1%} | "
                         f"{s['area']:.1%} |")
    lines.append(f"| paper | whole models (Fig. 4) | {PAPER_SAVING['time']:.0%} | "
                 f"{PAPER_SAVING['energy']:.0%} | |")
    lines += ["", "Total area is one unit of every op type used (the layers share units), not "
              "the sum of the layers' areas."]
    return "\n".join(lines)


def run_ops(args: argparse.Namespace) -> int:
    """``qtrain ops``: exactly one of SHAPE... and --model; prints tables or JSON."""
    from qkernels.opcount import bn_report, markdown_tables

    shapes = list(getattr(args, "shapes", None) or [])
    model = getattr(args, "model", None)
    batch = getattr(args, "batch", None)
    eps_log2 = getattr(args, "eps_log2", None)
    if shapes and model is not None:
        raise UserError("give either BN input SHAPEs or --model, not both")
    if not shapes and model is None:
        raise UserError("give BN input SHAPEs (e.g. 128x6x24x24) or --model "
                        f"({', '.join(MODELS)})")
    if model is None:
        if batch is not None:
            raise UserError("--batch goes with --model; a SHAPE already holds its batch size")
        try:
            reports = [bn_report(tuple(s), eps_log2=eps_log2) for s in shapes]
        except ValueError as err:
            raise UserError(str(err).splitlines()[0]) from None
        print(json.dumps(reports, indent=1) if args.json else markdown_tables(reports))
        return 0
    result = model_ops(model, DEFAULT_BATCH if batch is None else batch, eps_log2)
    print(json.dumps(result, indent=1) if args.json else model_markdown(result))
    return 0


# ============================================================================================
# stats
# ============================================================================================

def add_stats_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``RUN_DIR [--batches K] [--batch-size B] [--out FILE] [--data-dir DIR]``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (qtrain --out)")
    parser.add_argument("--batches", type=int, default=DEFAULT_STATS_BATCHES, metavar="K",
                        help=f"test batches to average over (default {DEFAULT_STATS_BATCHES})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_STATS_BATCH_SIZE,
                        metavar="B", help="images per batch (default "
                                          f"{DEFAULT_STATS_BATCH_SIZE})")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="the figure (default RUN_DIR/stats.png); the JSON goes next to it "
                             "with the suffix .json")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="where the test set is (default: the run's config)")
    return parser


def _is_bn(module) -> bool:
    import torch.nn as nn

    from .nn import L1BatchNorm1d, L1BatchNorm2d

    return isinstance(module, (L1BatchNorm1d, L1BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm2d))


def _deviations(x) -> tuple:
    """Per-channel (sigma_L2, sigma_L1, ratio) of ``x`` (channels in dim 1), float64 numpy."""
    import torch

    from .reference import sigma_ratio

    rows = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    centered = rows - rows.mean(dim=1, keepdim=True)
    l2 = centered.square().mean(dim=1).sqrt()
    l1 = centered.abs().mean(dim=1)
    return l2.cpu().numpy(), l1.cpu().numpy(), sigma_ratio(x).cpu().numpy()


def bn_sigma_ratios(model, batches) -> list[dict]:
    """sigma_L2 / sigma_L1 of every BN layer's input, per channel, averaged over ``batches``.

    Runs ``model`` in eval mode without gradients on each tensor of ``batches`` (an iterable);
    a forward pre-hook on every batch norm (L1BatchNorm1d/2d, nn.BatchNorm1d/2d) records the
    layer's input, of which the per-channel population sigma_L2, sigma_L1 and their ratio are
    taken per batch (a constant channel gives ratio NaN for that batch) and averaged over the
    batches (NaN batches left out). The model's training mode is restored afterwards.

    Returns, in forward order, ``[{"name", "type", "channels", "shape" (input shape of the
    first batch), "batches", "ratio", "sigma_l2", "sigma_l1"}]`` with per-channel numpy arrays.
    """
    import numpy as np
    import torch

    acc: dict[str, dict] = {}
    handles = []
    for name, module in model.named_modules():
        if _is_bn(module):
            def pre_hook(mod, inputs, name=name):
                l2, l1, ratio = _deviations(inputs[0])
                rec = acc.setdefault(name, {"name": name, "type": type(mod).__name__,
                                            "channels": int(inputs[0].shape[1]),
                                            "shape": [int(s) for s in inputs[0].shape],
                                            "l2": [], "l1": [], "ratio": []})
                rec["l2"].append(l2)
                rec["l1"].append(l1)
                rec["ratio"].append(ratio)
            handles.append(module.register_forward_pre_hook(pre_hook))
    from .fusion import unfused

    was_training = model.training
    n = 0
    try:
        model.eval()
        with torch.no_grad(), unfused(model):  # the hooks on the norms must fire
            for x in batches:
                model(x)
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def mean(arrays):
        stack = np.stack(arrays)
        ok = ~np.isnan(stack)
        cnt = ok.sum(axis=0)
        total = np.where(ok, stack, 0.0).sum(axis=0)
        return np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)

    return [{"name": r["name"], "type": r["type"], "channels": r["channels"],
             "shape": r["shape"], "batches": len(r["ratio"]), "ratio": mean(r["ratio"]),
             "sigma_l2": mean(r["l2"]), "sigma_l1": mean(r["l1"])} for r in acc.values()]


def ratio_summary(ratio) -> dict:
    """mean, std (population), min, max of a layer's finite ratios; ``nan_channels`` counted."""
    import numpy as np

    r = np.asarray(ratio, dtype=np.float64)
    ok = r[np.isfinite(r)]
    if ok.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None,
                "nan_channels": int(r.size)}
    return {"mean": float(ok.mean()), "std": float(ok.std()), "min": float(ok.min()),
            "max": float(ok.max()), "nan_channels": int(r.size - ok.size)}


def _json_list(a) -> list:
    return [None if not math.isfinite(v) else float(v) for v in a.tolist()]


def plot_stats(path: Path, layers: list[dict]) -> None:
    """Fig. 3: heat map of the ratios (layers x channels, top) and histograms of sigma_L2 and
    sigma_L1 over all channels on a log x axis (bottom); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .files import save_figure

    width = max(l["channels"] for l in layers)
    grid = np.full((len(layers), width), np.nan)
    for i, l in enumerate(layers):
        grid[i, :l["channels"]] = l["ratio"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 3 + 0.35 * len(layers) + 3.5),
                                   gridspec_kw={"height_ratios": [1 + 0.15 * len(layers), 1.6]})
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax1.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                    cmap=cmap)
    ax1.set_yticks(range(len(layers)), [l["name"] for l in layers])
    ax1.set(xlabel="channel", ylabel="BN layer",
            title=r"$\sigma_{L_2}/\sigma_{L_1}$ per layer and channel "
                  rf"(Theorem 1: $\sqrt{{\pi/2}}$ = {SQRT_PI_2:.4f})")
    fig.colorbar(im, ax=ax1, label="ratio")
    l2 = np.concatenate([l["sigma_l2"] for l in layers])
    l1 = np.concatenate([l["sigma_l1"] for l in layers])
    pos = np.concatenate([l2[np.isfinite(l2) & (l2 > 0)], l1[np.isfinite(l1) & (l1 > 0)]])
    if pos.size:
        lo, hi = pos.min(), pos.max()
        if hi <= lo:
            lo, hi = lo / 2, hi * 2
        bins = np.geomspace(lo, hi, 41)
        for values, label in ((l2, r"$\sigma_{L_2}$"), (l1, r"$\sigma_{L_1}$")):
            v = values[np.isfinite(values) & (values > 0)]
            weights = np.full(v.size, 1.0 / max(v.size, 1))
            ax2.hist(v, bins=bins, weights=weights, alpha=0.6, label=label)
        ax2.set_xscale("log")
        ax2.legend()
    ax2.set(xlabel="deviation (log scale)", ylabel="fraction of channels",
            title="histograms of the per-channel deviations")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(Path(path), fig, dpi=100)
    plt.close(fig)


def stats_markdown(result: dict) -> str:
    lines = [f"sigma_L2 / sigma_L1 of the BN inputs: {result['run_dir']}, {result['batches']} "
             f"test batches of {result['batch_size']} ({result['images']} images); Theorem 1 "
             f"predicts sqrt(pi/2) = {SQRT_PI_2:.4f}", "",
             "| layer | type | channels | mean | std | min | max | constant channels |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    for l in [*result["layers"], {"name": "all", "type": "", "channels": sum(
            l["channels"] for l in result["layers"]), **result["overall"]}]:
        lines.append(f"| {l['name']} | {l['type']} | {l['channels']} | {f(l['mean'])} | "
                     f"{f(l['std'])} | {f(l['min'])} | {f(l['max'])} | {l['nan_channels']} |")
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    """``qtrain stats``: writes the figure and JSON, prints the per-layer table."""
    import numpy as np

    from .files import write_text
    from .run import check_trained, load_trained

    run_dir = Path(args.run_dir)
    batches, batch_size = args.batches, args.batch_size
    if batches is None or batches < 1:
        raise UserError(f"--batches {batches} must be at least 1")
    if batch_size is None or batch_size < 2:
        raise UserError(f"--batch-size {batch_size} must be at least 2 (a deviation needs more "
                        "than one value per channel)")
    check_trained(run_dir)
    out = Path(args.out) if getattr(args, "out", None) else run_dir / "stats.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    cfg, model, _, _, _, test_set = load_trained(run_dir, getattr(args, "data_dir", None))

    from .train import to_input

    n_images = min(len(test_set), batches * batch_size)
    starts = [s for s in range(0, n_images, batch_size) if n_images - s >= 2]
    layers = bn_sigma_ratios(model, (to_input(test_set.images[s:s + batch_size])
                                     for s in starts))
    if not layers:
        raise UserError(f"{run_dir}: model {cfg.model} with norm {cfg.norm} has no batch norm "
                        "layers to measure")
    all_ratios = np.concatenate([l["ratio"] for l in layers])
    result = {"run_dir": str(run_dir), "model": cfg.model, "norm": cfg.norm, "bits": cfg.bits,
              "batches": len(starts), "batch_size": batch_size, "images": n_images,
              "theorem1": SQRT_PI_2,
              "layers": [{"name": l["name"], "type": l["type"], "channels": l["channels"],
                          "shape": l["shape"], **ratio_summary(l["ratio"]),
                          "ratio": _json_list(l["ratio"]),
                          "sigma_l2": _json_list(l["sigma_l2"]),
                          "sigma_l1": _json_list(l["sigma_l1"])} for l in layers],
              "overall": ratio_summary(all_ratios)}
    plot_stats(out, layers)
    result["figure"] = str(out)
    write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    print(stats_markdown(result))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0
