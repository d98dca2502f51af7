"""Frozen integer inference: every exponent of an eval-mode network fixed.

Today's eval rounds each activation with the range exponent of the batch it is in, so the
same image can get a different answer in another batch. Freezing fixes every exponent once:

1. :func:`calibrate` runs the network in eval mode on calibration images (training images, in a
   fixed order, in batches of 500 as the test set is evaluated) and takes, per activation
   quantizer, the upper median of the exponents its range rule picked on the batches (the
   exponent of a typical batch; ``rule="max"``: the largest, which saturates nothing on
   the calibration batches but lets one outlier batch coarsen every answer);
2. :func:`freeze` gives each :class:`~qtrain.quant.Quantize` that exponent
   (``frozen_exp``) and each quantized L1 batch norm its input's (``frozen_in_exp``), so the
   norm's folded multiplier, offset and shift are one per channel for good. Weights are
   already batch-independent (rounded from the store), and the norms' output exponent is the
   last training batch's (``last_out_exp``), as before.

In eval mode a frozen network's prediction for an image is the same in any batch; training
ignores the frozen exponents. :func:`unfreeze` returns to the range rule. The exported
networks (:mod:`qtrain.export`) compute exactly what a frozen network computes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from qkernels.quant import calibrated_exponent

from .export_cli import CALIBRATION_IMAGES
from .fusion import unfused
from .nn import _L1BatchNorm
from .quant import FLOAT_BITS, Quantize, top_exponent
from .train import to_input


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantize]]:
    """The activation quantizers of ``model`` that round going forward, by module name, in
    execution order for the sequential networks here."""
    for name, m in model.named_modules():
        if isinstance(m, Quantize) and m.bits_fwd < FLOAT_BITS:
            yield name, m


@torch.no_grad()
def calibrate(model: nn.Module, images: np.ndarray, *, batch_size: int = 500,
              device="cpu", rule: str = "median") -> dict[str, int]:
    """The exponent of each forward quantizer: its range rule's exponents on the batches of
    ``images`` (uint8, as the data loaders give them), run in eval mode with the exponents
    unfrozen, reduced by ``rule`` (:func:`qkernels.quant.calibrated_exponent`). A quantizer
    that only ever saw zeros is left out."""
    if len(images) == 0:
        raise ValueError("calibrate needs at least one image")
    was_training = model.training
    saved = {name: m.frozen_exp if isinstance(m, Quantize) else m.frozen_in_exp
             for name, m in model.named_modules() if isinstance(m, (Quantize, _L1BatchNorm))}
    found: dict[str, list[int]] = {}

    def record(name):
        def hook(module, args):
            top = top_exponent(args[0])
            if top is not None:
                found.setdefault(name, []).append(top - (module.bits_fwd - 1))
        return hook

    handles = []
    try:
        unfreeze(model)  # the range rule everywhere, the norms' inputs included
        for name, q in quantizers(model):
            handles.append(q.register_forward_pre_hook(record(name)))
        model.eval()
        with unfused(model):  # the hooks on the quantizers must fire
            for start in range(0, len(images), batch_size):
                model(to_input(images[start:start + batch_size], device))
    finally:
        for h in handles:
            h.remove()
        for name, m in model.named_modules():
            if name in saved:
                setattr(m, "frozen_exp" if isinstance(m, Quantize) else "frozen_in_exp",
                        saved[name])
        model.train(was_training)
    return {name: calibrated_exponent(exps, rule) for name, exps in found.items()}


def freeze(model: nn.Module, exponents: dict[str, int]) -> nn.Module:
    """Fix the forward quantizers' exponents (``exponents`` by module name, as from
    :func:`calibrate`; a quantizer not named keeps exponent 0) and each quantized L1 norm's
    input exponent (the nearest quantizer before it); returns ``model``."""
    unknown = set(exponents) - {name for name, _ in quantizers(model)}
    if unknown:
        raise ValueError(f"exponents name no quantizer of this model: {sorted(unknown)}")
    last: Quantize | None = None
    for name, m in model.named_modules():
        if isinstance(m, Quantize) and m.bits_fwd < FLOAT_BITS:
            if m.channels:
                raise ValueError(f"cannot freeze {name}: it rounds each channel at its own "
                                 "exponent (norm_input_exp channel), which frozen inference "
                                 "does not support yet; train with norm_input_exp tensor")
            m.frozen_exp = int(exponents.get(name, 0))
            last = m
        elif isinstance(m, _L1BatchNorm) and m.quantized:
            if last is None or last.bits_fwd != m.qconfig.bits_a:
                raise ValueError(f"cannot freeze {name or 'the model'}: no {m.qconfig.bits_a}-bit "
                                 "quantizer before it")
            m.frozen_in_exp = last.frozen_exp
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Back to the range rule (today's eval); returns ``model``."""
    for m in model.modules():
        if isinstance(m, Quantize):
            m.frozen_exp = None
        elif isinstance(m, _L1BatchNorm):
            m.frozen_in_exp = None
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether every forward quantizer of ``model`` has a frozen exponent (and there is one)."""
    qs = [q for _, q in quantizers(model)]
    return bool(qs) and all(q.frozen_exp is not None for q in qs)


def calibrate_and_freeze(model: nn.Module, images: np.ndarray, *,
                         count: int = CALIBRATION_IMAGES, batch_size: int = 500,
                         device="cpu", rule: str = "median") -> dict[str, int]:
    """:func:`calibrate` on the first ``count`` of ``images``, then :func:`freeze`; returns
    the exponents."""
    exps = calibrate(model, images[:count], batch_size=batch_size, device=device, rule=rule)
    freeze(model, exps)
    return exps
