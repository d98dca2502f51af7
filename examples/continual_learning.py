#!/usr/bin/env python
"""On-device continual learning: pre-train with qtrain, export, learn new classes torch-free.

1. Workstation (qtrain, torch): train a W8A8G8E8 L1BN network (``--model``, default the small
   ``lenet5``) on 8 of the 10 Fashion-MNIST classes (0-7; its head has 10 outputs, two of
   them never a target), freeze it on calibration images and export it, training state
   included, to ``OUT/model.qk`` (what ``qtrain export RUN_DIR --format qk`` writes).
2. Device (numpy + numba only; the ``device`` step runs in its own process and checks that
   torch was never imported): ``qkernels.trainer.Trainer`` loads the file and learns the two
   new classes (8 "Bag" and 9 "Ankle boot") from their training images, each batch half new
   images and half a small replay buffer of old-class images kept on the device
   (``--replay`` per old class; 0: new images only, to show forgetting). Before and after,
   the network is frozen on the device (``Trainer.frozen_network``) and its accuracy
   measured on the old and the new classes of the test set.

Usage (from the repository root)::

    python examples/continual_learning.py --out runs/continual          # both steps
    python examples/continual_learning.py --out runs/continual --replay 0
    python examples/continual_learning.py device runs/continual/model.qk runs/continual/device.npz \
        [--new-per-batch 64] [--epochs 2] [--lr 0.01]

Writes ``OUT/model.qk``, ``OUT/device.npz`` (the device's data) and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OLD, NEW = tuple(range(8)), (8, 9)


def workstation(args) -> None:
    import numpy as np
    import torch

    from qtrain.data import load_dataset
    from qtrain.export import network_description, training_state, write_qk
    from qtrain.frozen import calibrate_and_freeze
    from qtrain.models import build
    from qtrain.optim import QSGD
    from qtrain.quant import QConfig
    from qtrain.train import evaluate, train_epoch

    train, test = load_dataset("fashion-mnist", download_missing=False)
    print(f"data: {train.source}")
    old = np.isin(train.labels, OLD)
    qconfig = QConfig(seed=args.seed)
    torch.manual_seed(args.seed)
    model = build(args.model, "l1", qconfig)
    opt = QSGD(model.parameters(), lr=args.lr, momentum=0.9, qconfig=qconfig)
    x_old, y_old = train.images[old], train.labels[old]
    t_old = np.isin(test.labels, OLD)
    for epoch in range(args.epochs):
        stats = train_epoch(model, opt, x_old, y_old, batch_size=128, seed=args.seed,
                            epoch=epoch)
        err = evaluate(model, test.images[t_old], test.labels[t_old])
        print(f"workstation epoch {epoch + 1}/{args.epochs}: train loss "
              f"{stats['train_loss']:.3f}, old-class test error {100 * err:.2f}% "
              f"({stats['seconds']:.0f} s)")
    calibrate_and_freeze(model, x_old[:10_000])
    manifest, arrays = network_description(model, (1, 28, 28), list(train.classes))
    state, state_arrays = training_state(model, opt, model.qstate.step)
    manifest["training"] = state
    out = Path(args.out)
    write_qk(out / "model.qk", manifest, {**arrays, **state_arrays})
    # what the device holds: its new-class images, a replay buffer, and a test set
    rng = np.random.default_rng(args.seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(y_old == c), args.replay, replace=False)
                           for c in OLD]) if args.replay else np.zeros(0, np.int64)
    new = np.isin(train.labels, NEW)
    np.savez(out / "device.npz", new_x=train.images[new], new_y=train.labels[new],
             replay_x=x_old[keep], replay_y=y_old[keep], test_x=test.images,
             test_y=test.labels)
    print(f"exported {out / 'model.qk'} ({(out / 'model.qk').stat().st_size:,} bytes) after "
          f"{model.qstate.step} steps on classes {OLD[0]}-{OLD[-1]}")


def device(qk_path: str, data_path: str, new_per_batch: int = 64, epochs: int = 2,
           lr: float = 0.01, seed: int = 0) -> dict:
    """Torch-free: learn the new classes with qkernels alone; accuracy before and after."""
    import numpy as np

    from qkernels.trainer import Trainer

    d = np.load(data_path)
    trainer = Trainer.load(qk_path)
    old_t, new_t = np.isin(d["test_y"], OLD), np.isin(d["test_y"], NEW)

    def accuracy(calib):
        net = trainer.frozen_network(calib)
        pred = net.predict(d["test_x"][:, None])
        return {"old_classes": float((pred[old_t] == d["test_y"][old_t]).mean()),
                "new_classes": float((pred[new_t] == d["test_y"][new_t]).mean()),
                "all": float((pred == d["test_y"]).mean())}

    calib = np.concatenate([d["replay_x"], d["new_x"][:2000]]) if len(d["replay_x"]) \
        else d["new_x"][:2000]
    before = accuracy(calib)
    rng = np.random.default_rng(seed)
    n_new, n_replay = len(d["new_y"]), len(d["replay_y"])
    half = new_per_batch if n_replay else 2 * new_per_batch
    start = time.perf_counter()
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(n_new)
        for s in range(0, n_new - half + 1, half):
            idx = order[s:s + half]
            x, y = d["new_x"][idx], d["new_y"][idx]
            if n_replay:
                r = rng.choice(n_replay, half, replace=False)
                x = np.concatenate([x, d["replay_x"][r]])
                y = np.concatenate([y, d["replay_y"][r]])
            trainer.step(x[:, None], y, lr=lr)
            steps += 1
    seconds = time.perf_counter() - start
    after = accuracy(calib)
    return {"before": before, "after": after, "device_steps": steps,
            "batch": half + (half if n_replay else 0),
            "device_seconds": round(seconds, 1), "lr": lr, "epochs_over_new_data": epochs,
            "replay_images": int(n_replay), "torch_imported": "torch" in sys.modules}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "device":
        d = argparse.ArgumentParser(prog="continual_learning.py device")
        d.add_argument("qk")
        d.add_argument("data")
        d.add_argument("--new-per-batch", type=int, default=64)
        d.add_argument("--epochs", type=int, default=2)
        d.add_argument("--lr", type=float, default=0.01)
        a = d.parse_args(sys.argv[2:])
        print(json.dumps(device(a.qk, a.data, a.new_per_batch, a.epochs, a.lr)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/continual")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--replay", type=int, default=100, help="old images per class kept on "
                   "the device (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    workstation(args)
    res = subprocess.run([sys.executable, __file__, "device", str(out / "model.qk"),
                          str(out / "device.npz")], capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result.update(model=args.model, workstation_epochs=args.epochs,
                  command=" ".join(["python", *sys.argv]),
                  total_seconds=round(time.perf_counter() - t, 1))
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    for when in ("before", "after"):
        r = result[when]
        print(f"{when:6s} device training: old classes {100 * r['old_classes']:.1f}%, new "
              f"classes {100 * r['new_classes']:.1f}%, all {100 * r['all']:.1f}%")
    print(f"device: {result['device_steps']} steps of {result['batch']} images in "
          f"{result['device_seconds']} s, torch "
          f"{'imported' if result['torch_imported'] else 'never imported'}")


if __name__ == "__main__":
    main()
