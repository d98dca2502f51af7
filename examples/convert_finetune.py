#!/usr/bin/env python
"""A float-trained LeNet-5, converted to integer training and fine-tuned (issue 16's figure).

    python examples/convert_finetune.py                 # Fashion-MNIST, about 5 minutes on 2 cores
    python examples/convert_finetune.py --json out.json # also write the figures as JSON

1. A plain torch LeNet-5 (the shape of qtrain's ``lenet5``: conv 6 - pool - conv 16 - pool -
   fc 120 - fc 84 - fc 10, float BatchNorm after every conv and hidden fc, biases everywhere as
   torch's defaults) trains in float32 with ``torch.optim.SGD`` (the default recipe's schedule:
   ``--float-epochs`` epochs, lr 0.1 divided by 10 after 60% and 90% of them, momentum 0.9).
2. ``qtrain.convert`` makes it a W8A8G8E8 network with integer L1 batch norm (the biases
   before a norm folded into it, the classifier's kept as a quantized bias), and
   ``qtrain.calibrate`` sets the norms' output exponents on 256 training images.
3. It is evaluated right away, then fine-tuned with integer SGD (``QSGD``) for
   ``--int-epochs`` epochs at lr ``--lr`` and evaluated after each.

Every test error is on the full 10,000-image test set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import qtrain
from qtrain.data import batches, load_mnist_like
from qtrain.optim import QSGD
from qtrain.quant import QConfig
from qtrain.train import evaluate, to_input, train_epoch


def float_lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.BatchNorm1d(120), nn.ReLU(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU(),
        nn.Linear(84, 10))


def train_float(model, x, y, epochs: int, batch_size: int, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    milestones = [round(0.6 * epochs), round(0.9 * epochs)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    model.train()
    for epoch in range(epochs):
        for idx in batches(x, y, batch_size, seed, epoch):
            loss = F.cross_entropy(model(to_input(x[idx])), torch.from_numpy(y[idx]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        print(f"float epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float-epochs", type=int, default=10)
    ap.add_argument("--int-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.001, help="integer fine-tuning lr (0.001)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on the first N training images only (a quick check)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    train = load_mnist_like("fashion-mnist", "train", args.data_dir)
    test = load_mnist_like("fashion-mnist", "test", args.data_dir)
    if args.train_images is not None:
        n = args.train_images
        train = dataclasses.replace(train, images=train.images[:n], labels=train.labels[:n])
    print(f"data: {train.source}", file=sys.stderr)
    start = time.perf_counter()
    model = float_lenet5()
    train_float(model, train.images, train.labels, args.float_epochs, args.batch_size, args.seed)
    result = {"float_test_error": evaluate(model, test.images, test.labels)}

    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8, seed=args.seed)
    net = qtrain.convert(model, cfg, "l1")
    qtrain.calibrate(net, to_input(train.images[:256]))
    result["converted_test_error"] = evaluate(net, test.images, test.labels)
    opt = QSGD(net.parameters(), lr=args.lr, momentum=0.9, qconfig=cfg)
    result["finetuned_test_error"] = []
    for epoch in range(args.int_epochs):
        train_epoch(net, opt, train.images, train.labels, batch_size=args.batch_size,
                    seed=args.seed, epoch=epoch)
        result["finetuned_test_error"].append(evaluate(net, test.images, test.labels))
    result.update(seconds=round(time.perf_counter() - start, 1), **vars(args),
                  qtrain_version=qtrain.__version__)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
