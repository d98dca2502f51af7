#!/usr/bin/env python
"""The memory a training step of qkernels' torch-free engine needs, for each exportable model.

Usage (from the repository root)::

    python bench/engine_memory.py --json                 # lenet5, lenet5-paper, mlp, vgg7
    python bench/engine_memory.py --models vgg7 --batch-size 64

Per model: a W8A8G8E8 L1BN network (``qtrain.models.build``) takes one integer step of qtrain's
int backend on random uint8 images of its input shape (so the optimizer state exists), is
frozen and exported to a qk file; then, in this process, ``qkernels.trainer.Trainer`` takes
two steps on other random images and the second is measured:

* ``state_mb``: what the device keeps between steps: weight stores (int32) and velocities
  (int64) of every parameter, running statistics (int64);
* ``step_arrays_peak_mb``: the peak of the numpy arrays allocated during the step
  (tracemalloc, which numpy reports to), above what was allocated before it: activations and
  caches kept for the backward, errors, products, gradients;
* ``weights``: the parameter count. Inputs are random, so the figures are the shapes', not a
  trained network's (the sizes do not depend on the values, except float-vs-int choices of
  exact products, which depend on the codes' peaks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path

SHAPES = {"lenet5": (1, 28, 28), "lenet5-paper": (1, 28, 28), "mlp": (1, 28, 28),
          "vgg7": (3, 32, 32)}


def measure(model_name: str, batch: int, tmp: Path) -> dict:
    import numpy as np
    import torch

    from qkernels.trainer import Trainer
    from qtrain.export import network_description, training_state, write_qk
    from qtrain.frozen import calibrate_and_freeze
    from qtrain.loss import cross_entropy
    from qtrain.models import build
    from qtrain.optim import QSGD
    from qtrain.quant import QConfig
    from qtrain.train import to_input

    c, h, w = SHAPES[model_name]
    rng = np.random.default_rng(0)

    def images(n):
        shape = (n, h, w) if c == 1 else (n, h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    qconfig = QConfig()
    torch.manual_seed(0)
    kwargs = {"in_features": h * w * c} if model_name == "mlp" else {"in_channels": c}
    model = build(model_name, "l1", qconfig, **kwargs)
    opt = QSGD(model.parameters(), lr=0.1, momentum=0.9, qconfig=qconfig)
    x, y = images(batch), rng.integers(0, 10, batch)
    loss = cross_entropy(model(to_input(x)), torch.from_numpy(y), qconfig)
    loss.backward()
    opt.step(batch_size=batch)
    model.qstate.step += 1
    calibrate_and_freeze(model, images(batch))
    manifest, arrays = network_description(model, (c, h, w))
    state, state_arrays = training_state(model, opt, model.qstate.step)
    manifest["training"] = state
    path = tmp / f"{model_name}.qk"
    write_qk(path, manifest, {**arrays, **state_arrays})
    trainer = Trainer.load(path)

    def device_images(n):
        x = images(n)
        return x[:, None] if c == 1 else x.transpose(0, 3, 1, 2)

    trainer.step(device_images(batch), rng.integers(0, 10, batch))
    x2, y2 = device_images(batch), rng.integers(0, 10, batch)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    trainer.step(x2, y2)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    st = trainer.network_state()
    state_bytes = sum(p["store"].nbytes + p["velocity"].nbytes for p in st["parameters"].values())
    state_bytes += sum(n["running_mean"].nbytes + n["running_dev"].nbytes
                       for n in st["norms"].values())
    return {"batch": batch, "input": [c, h, w],
            "weights": int(sum(p.numel() for p in model.parameters())),
            "state_mb": round(state_bytes / 2**20, 2),
            "step_arrays_peak_mb": round(peak / 2**20, 1),
            "file_mb": round(path.stat().st_size / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models.split(","):
            if m not in SHAPES:
                sys.exit(f"engine_memory: unknown model {m!r} (choose from {', '.join(SHAPES)})")
            print(f"engine_memory: {m}", file=sys.stderr)
            out[m] = measure(m, args.batch_size, Path(tmp))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'model':14s} {'weights':>11s} {'state MB':>9s} {'step peak MB':>13s} {'file MB':>8s}")
    for m, r in out.items():
        print(f"{m:14s} {r['weights']:11,d} {r['state_mb']:9.2f} {r['step_arrays_peak_mb']:13.1f} "
              f"{r['file_mb']:8.2f}")


if __name__ == "__main__":
    main()
