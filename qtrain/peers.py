"""Peer methods qtrain is compared with: Brevitas W8A8 quantization-aware training of the LeNets.

* :func:`import_brevitas` -- the Brevitas modules used, or :class:`MissingBrevitas` (a one-line
  message) when the optional ``bench`` extra is not installed.
* :func:`brevitas_model` -- qtrain's ``lenet5`` or ``lenet5-paper`` topology with Brevitas 8-bit
  fixed-point weight and activation quantizers (the networks of ``bench/bench_train.py``'s
  ``brevitas`` method); :func:`brevitas_lenet5` is the first.
* :func:`train_brevitas` -- a training run of that network written like :func:`qtrain.run.train`
  (``config.json``, ``metrics.jsonl``, ``summary.json``, ``curves.png``): the same data, subset,
  batches (``qtrain.data.batches(seed, epoch)``), input codes, learning-rate schedule
  (``RunConfig.lr_at``) and seed as a qtrain run of the same config, through qtrain's own
  :func:`~qtrain.train.train_epoch` and :func:`~qtrain.train.evaluate` with
  ``torch.optim.SGD`` (so ``F.cross_entropy``).

Importing this module imports no torch; the functions do.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from .config import RunConfig, UserError


class MissingBrevitas(RuntimeError):
    """Brevitas is not installed."""


def import_brevitas():
    """``(brevitas, brevitas.nn, Int8WeightPerTensorFixedPoint, Int8ActPerTensorFixedPoint)``."""
    try:
        import brevitas
        import brevitas.nn as qnn
        from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint
    except ImportError as err:
        raise MissingBrevitas(f"brevitas is not installed ({err}); pip install -e .[bench]") \
            from None
    return brevitas, qnn, Int8WeightPerTensorFixedPoint, Int8ActPerTensorFixedPoint


def brevitas_available() -> bool:
    """True when Brevitas can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("brevitas") is not None


#: The Brevitas peer's networks: qtrain model name -> (convs (in, out), hidden fcs (in, out)).
#: Every conv is 5x5 without padding, followed by BN, ReLU and a 2x2 max-pool.
BREVITAS_MODELS = {"lenet5": ([(1, 6), (6, 16)], [(16 * 4 * 4, 120), (120, 84)]),
                   "lenet5-paper": ([(1, 32), (32, 64)], [(64 * 4 * 4, 512)])}


def brevitas_model(model: str = "lenet5", classes: int = 10, bits: int = 8):
    """qtrain's ``lenet5`` or ``lenet5-paper`` topology with Brevitas ``bits``-bit fixed-point
    weight/activation quantizers.

    ``nn.BatchNorm2d/1d`` between each conv / hidden fc (no bias) and its ``QuantReLU``; a
    ``QuantIdentity`` input quantizer; float bias and logits of the last layer. ``bits`` other
    than 8 overrides the Int8 quantizers' bit width.
    """
    import torch.nn as nn

    if model not in BREVITAS_MODELS:
        raise UserError(f"the Brevitas peer builds {', '.join(BREVITAS_MODELS)}, not {model}")
    _, qnn, wq, aq = import_brevitas()
    w = {"weight_quant": wq, "bias": False}
    a = {"act_quant": aq, "return_quant_tensor": False}
    if bits != 8:
        w["weight_bit_width"] = bits
        a["bit_width"] = bits
    last = {k: v for k, v in w.items() if k != "bias"}
    convs, fcs = BREVITAS_MODELS[model]
    layers = [qnn.QuantIdentity(**a)]
    for cin, cout in convs:
        layers += [qnn.QuantConv2d(cin, cout, 5, **w), nn.BatchNorm2d(cout),
                   qnn.QuantReLU(**a), nn.MaxPool2d(2)]
    layers.append(nn.Flatten())
    for fin, fout in fcs:
        layers += [qnn.QuantLinear(fin, fout, **w), nn.BatchNorm1d(fout), qnn.QuantReLU(**a)]
    layers.append(qnn.QuantLinear(fcs[-1][1], classes, bias=True, **last))
    return nn.Sequential(*layers)


def brevitas_lenet5(classes: int = 10, bits: int = 8):
    """:func:`brevitas_model` of qtrain's ``lenet5`` (conv5x5 6, pool, conv5x5 16, pool, fc 120,
    fc 84, fc 10)."""
    return brevitas_model("lenet5", classes, bits)


def train_brevitas(cfg: RunConfig, out: Path, *, bits: int = 8, download: bool = True,
                   stdout: TextIO | None = None, recipe: str | None = None) -> dict:
    """Train :func:`brevitas_model` of ``cfg.model`` on ``cfg``'s data and schedule into run
    directory ``out``.

    Writes the files of a qtrain run (no checkpoint: an interrupted peer run restarts) and
    returns the summary (``final_test_error``, ``best_test_error``, ``wall_s``, ...; ``bits``
    reads ``W{bits}A{bits}`` and ``backend`` ``brevitas``).
    """
    import torch

    from .files import write_text
    from .run import CONFIG, CURVES, METRICS, SUMMARY, load_data, plot_curves
    from .train import evaluate, train_epoch

    stdout = sys.stdout if stdout is None else stdout
    if cfg.model not in BREVITAS_MODELS:
        raise UserError(f"the Brevitas peer builds {', '.join(BREVITAS_MODELS)}, not "
                        f"{cfg.model}; use a recipe of one of those")
    import_brevitas()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_data(cfg, download=download)
    print(f"data: {train_set.source}", file=stdout, flush=True)
    torch.manual_seed(cfg.seed)
    model = brevitas_model(cfg.model, bits=bits).to(cfg.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    write_text(out / CONFIG, cfg.to_json() + "\n")
    write_text(out / METRICS, "")
    images, labels = train_set.images, train_set.labels
    history: list[dict] = []
    wall_s = 0.0
    summary: dict = {}
    for epoch in range(cfg.epochs):
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_epoch(model, optimizer, images, labels, batch_size=cfg.batch_size,
                            seed=cfg.seed, epoch=epoch, device=cfg.device)
        t0 = time.perf_counter()
        test_error = evaluate(model, test_set.images, test_set.labels, device=cfg.device)
        seconds = stats["seconds"] + time.perf_counter() - t0
        wall_s += seconds
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": stats["train_loss"],
                  "train_error": stats["train_error"], "test_error": test_error,
                  "seconds": seconds, "images_per_s": stats["images_per_s"], "quant": {}}
        history.append(record)
        plot_curves(out / CURVES, history)
        best = min(history, key=lambda m: m["test_error"])
        summary = {"epochs_done": len(history), "epochs": cfg.epochs,
                   "final_test_error": test_error, "best_test_error": best["test_error"],
                   "best_epoch": best["epoch"], "final_train_loss": record["train_loss"],
                   "wall_s": wall_s, "bits": f"W{bits}A{bits}", "norm": "l2",
                   "backend": "brevitas", "model": cfg.model, "data": cfg.data,
                   "data_source": train_set.source, "recipe": recipe}
        write_text(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {record['train_loss']:.4f}  "
              f"test error {100 * test_error:6.2f}%  {seconds:6.1f} s", file=stdout, flush=True)
    return summary
