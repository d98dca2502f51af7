"""Which error quantizer costs the 8-bit network its accuracy? (issue 10's ablation)

Trains the paper's LeNet-5 (``lenet5-paper``, L1BN, ``int`` backend, W8 A8 G8, lr 0.1, momentum
0.9, batch 128, the data order of seed 0) for a few epochs with the errors rounded per site:

* ``logits``: the error at the logits (the head's quantizer),
* ``out``: the error at each block's output (after ReLU and pool: the quantizer that ends a
  block),
* ``norm``: the error each L1BN hands back to its conv or linear layer (the block's first
  quantizer, after the norm's backward kernel).

A variant gives each site a width and a rule (nearest with one exponent per tensor, nearest
with one per sample, or stochastic); the sites it does not name keep 16 bits. The errors then
travel as 16-bit codes (``bits_e = 16``), so only the rounding at each site differs between
variants. They round as the full configurations do, not bit for bit: ``all8`` as the recipe's
W8A8G8E8 run (the norm's error rounded twice, to 16 bits in the kernel and then to 8, instead
of once), ``all8-norm-sr`` as ``norm_errors = "stochastic"`` (another random stream),
``all8-sample`` as ``error_exp = "sample"``, ``all8-sr`` as ``stochastic_errors = true``. Prints
one JSON line per epoch: the training loss and error.

    python scripts/error_sites.py --variants all8,all16,logits8,out8,norm8 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

#: variant -> {site: (bits, rule)}; rule "nearest" | "sample" | "stochastic"
VARIANTS = {
    "all16": {},
    "all8": {"logits": (8, "nearest"), "out": (8, "nearest"), "norm": (8, "nearest")},
    "logits8": {"logits": (8, "nearest")},
    "out8": {"out": (8, "nearest")},
    "norm8": {"norm": (8, "nearest")},
    "norm8-sample": {"norm": (8, "sample")},
    "norm8-sr": {"norm": (8, "stochastic")},
    "all8-sample": {"logits": (8, "sample"), "out": (8, "sample"), "norm": (8, "sample")},
    "all8-sr": {"logits": (8, "stochastic"), "out": (8, "stochastic"),
                "norm": (8, "stochastic")},
    "all8-norm-sr": {"logits": (8, "nearest"), "out": (8, "nearest"),
                     "norm": (8, "stochastic")},
}


def site_of(name: str, module) -> str | None:
    """The site of a quantizer by its place in the model: ``N.quant`` (a block's first),
    ``N.out`` (a block's last), or the head's."""
    if name.endswith(".quant"):
        return "norm"
    if name.endswith(".out"):
        return "out"
    return "logits" if module.bits_fwd == 16 else None


def build(variant: str):
    import torch

    from qtrain.models import build as build_model
    from qtrain.quant import QConfig, Quantize

    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=16, seed=0)
    torch.manual_seed(0)
    net = build_model("lenet5-paper", "l1", cfg)
    sites = VARIANTS[variant]
    for name, m in net.named_modules():
        if isinstance(m, Quantize) and (site := site_of(name, m)) in sites:
            m.bits_bwd, rule = sites[site]
            m.sample_exp = rule == "sample"
            m.stochastic_bwd = rule == "stochastic"
    return net, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all8,all16,norm8-sr",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")

    from qtrain.data import load_dataset
    from qtrain.optim import QSGD
    from qtrain.train import train_epoch

    train, _ = load_dataset("fashion-mnist")
    for variant in variants:
        net, cfg = build(variant)
        opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)
        for epoch in range(args.epochs):
            start = time.perf_counter()
            r = train_epoch(net, opt, train.images, train.labels, batch_size=128, seed=0,
                            epoch=epoch)
            print(json.dumps({"variant": variant, "epoch": epoch + 1,
                              "train_loss": round(r["train_loss"], 4),
                              "train_error": round(r["train_error"], 4),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
