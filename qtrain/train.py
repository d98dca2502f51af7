"""One readable training loop: epochs over index batches, evaluation, and the input format."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from . import distributed as dist
from . import intgemm
from .data import INPUT_EXP, batches, to_codes
from .loss import cross_entropy, sample_losses
from .optim import QSGD
from .quant import pow2


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images -> the network input: 8-bit codes * 2**INPUT_EXP, channels first.

    Grayscale (N, H, W) gives (N, 1, H, W); color (N, H, W, C) gives (N, C, H, W). The codes
    (``pixel - 128``, clipped to [-127, 127]) are the integer input of a quantized network;
    their float32 container is also the float network's input.
    """
    codes, _ = to_codes(images)
    x = torch.from_numpy(codes).to(device, torch.float32)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    x = x * pow2(INPUT_EXP)
    if x.device.type != "cpu":
        return x
    # the codes ride along for the int backend's integer GEMM (qtrain.intgemm.attach)
    codes = codes[:, None] if codes.ndim == 3 else np.ascontiguousarray(
        codes.transpose(0, 3, 1, 2))
    return intgemm.attach(x, codes, INPUT_EXP)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: np.ndarray,
                labels: np.ndarray, *, batch_size: int, seed: int, epoch: int, device="cpu",
                on_batch: Callable[[int, float, float], None] | None = None) -> dict:
    """Train one epoch in the order fixed by (seed, epoch); returns loss, accuracy and timing.

    ``model`` is a :class:`~qtrain.models.QNet` (its ``qconfig`` picks the loss, its ``qstate``
    counts the steps) or any float ``nn.Module`` (cross-entropy; the peers of
    :mod:`qtrain.peers`); :class:`~qtrain.optim.QSGD` is told the batch size, another optimizer
    steps as usual. ``on_batch(batch_index, loss, accuracy)`` is called after each step
    (progress bars; loss and accuracy of this process's shares so far).

    With several processes (:mod:`qtrain.distributed`) each trains on its share of every
    batch (:func:`~qtrain.distributed.shard`) in a synchronized step; the loss and error
    returned are the whole epoch's, the same at every world size: the loss sums per-sample
    values (:func:`~qtrain.loss.sample_losses`) in sample order.
    """
    model.train()
    start = time.perf_counter()
    total_loss = 0.0
    correct = seen = shared = 0
    with dist.whole_counts(model, replicated=True):
        for i, idx in enumerate(batches(images, labels, batch_size, seed, epoch)):
            loss_sum, right, mine = _train_step(model, optimizer, images, labels, idx, device)
            total_loss += loss_sum
            correct += right
            seen += len(idx)
            shared += mine
            if on_batch is not None:
                on_batch(i, total_loss / seen, correct / shared)
    seconds = time.perf_counter() - start
    correct, = dist.sum_counts([correct])
    return {"train_loss": total_loss / seen, "train_error": 1 - correct / seen,
            "seconds": seconds, "images_per_s": seen / seconds}


def _train_step(model, optimizer, images, labels, idx, device) -> tuple[float, int, int]:
    """One step on this process's share of the batch ``idx``: the batch's loss summed over its
    samples, this share's correct predictions and its size."""
    inner = getattr(model, "module", model)  # a DistributedDataParallel's network
    qconfig = getattr(inner, "qconfig", None)
    share = dist.shard(len(idx))
    part = idx[share]
    x = to_input(images[part], device)
    y = torch.from_numpy(labels[part].astype(np.int64)).to(device)
    with dist.synchronized(share.start):
        out = model(x)
        loss = cross_entropy(out, y, qconfig)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if isinstance(optimizer, QSGD):
        optimizer.step(batch_size=len(idx))
    else:
        optimizer.step()
    qstate = getattr(inner, "qstate", None)
    if qstate is not None:
        qstate.step += 1
    loss_sum = float(dist.gather_batch(sample_losses(out, y, qconfig), len(idx)).sum())
    return loss_sum, int((out.argmax(1) == y).sum()), len(part)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 500,
             device="cpu") -> float:
    """Test error (fraction misclassified) in eval mode.

    With several processes each evaluates whole batches in turn (batch ``k`` on rank ``k mod
    N``), so every batch is computed as one process would, and the counts are added up."""
    model.eval()
    wrong = 0
    world = dist.world()
    with dist.whole_counts(model, replicated=False):
        for k, start in enumerate(range(0, len(images), batch_size)):
            if k % world.size != world.rank:
                continue
            x = to_input(images[start:start + batch_size], device)
            y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
            wrong += int((model(x).argmax(1) != y).sum())
    wrong, = dist.sum_counts([wrong])
    return wrong / len(images)
