"""The training loss: float cross-entropy, or the integer base-2 softmax cross-entropy.

In a quantized network the loss's gradient is computed without floating point
(:func:`qkernels.loss.softmax_xent_error`): probabilities ``p = 2**L / sum 2**L`` of the logits
``L``, error ``p - onehot(y)`` per sample (the gradient of ``-log2 p_y``, in bits). The batch's
``1/N`` is not applied here but by the optimizer (``lr / N`` as a fixed-point constant), so the
error stays an exact integer grid. The loss value returned for people is the mean of
``-log2 p_y`` computed in float32 from the same logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from qkernels.loss import softmax_xent_error

from .quant import QConfig, from_codes, to_codes

#: Width of the logits fed to the integer loss.
LOGIT_BITS = 16
LN2 = math.log(2.0)


class _IntXentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits, labels)
        # for people only (the error does not use it): -log2 p_y is the natural-log
        # cross-entropy of the logits scaled by ln 2, over ln 2
        return F.cross_entropy(logits.detach() * LN2, labels) / LN2

    @staticmethod
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        err = softmax_xent_error(to_codes(logits, LOGIT_BITS), labels.cpu().numpy())
        return from_codes(err, logits), None


def sample_losses(logits: torch.Tensor, labels: torch.Tensor,
                  qconfig: QConfig | None = None) -> np.ndarray:
    """Each sample's loss as :func:`cross_entropy` states it (nats for float networks, bits for
    quantized ones), in float64, row by row: the same value for a sample whatever batch (or
    process) it is in, so sums of them in sample order do not depend on how a batch is split,
    and computed on the CPU, so they do not depend on the device either (a GPU's float64
    ``log_softmax`` may round the last bit differently)."""
    z, labels = logits.detach().cpu().double(), labels.cpu()
    if qconfig is not None and qconfig.quantized and qconfig.wage:
        from .wage import sample_losses as sse_losses

        return sse_losses(z, labels).numpy()
    if qconfig is None or not qconfig.quantized:
        return F.cross_entropy(z, labels, reduction="none").numpy()
    return (F.cross_entropy(z * LN2, labels, reduction="none") / LN2).numpy()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  qconfig: QConfig | None = None) -> torch.Tensor:
    """Mean cross-entropy of a batch.

    Float networks: ``F.cross_entropy`` (natural log, mean reduction). Quantized networks: the
    integer base-2 softmax cross-entropy (loss in bits; ``backward`` produces the per-sample
    error ``p - onehot``, the optimizer divides by the batch size, and the loss's own scale is
    not applied to the error). Under ``scheme = "wage"``: WAGE's sum of squared errors
    (:func:`qtrain.wage.sse`).
    """
    if qconfig is None or not qconfig.quantized:
        return F.cross_entropy(logits, labels)
    if qconfig.wage:
        from .wage import sse

        return sse(logits, labels)
    return _IntXentFn.apply(logits, labels)
