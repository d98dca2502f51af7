"""One readable training loop: epochs over index batches, evaluation, and the input format."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .data import INPUT_EXP, batches, to_codes
from .loss import cross_entropy
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
    return x * pow2(INPUT_EXP)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: np.ndarray,
                labels: np.ndarray, *, batch_size: int, seed: int, epoch: int, device="cpu",
                on_batch: Callable[[int, float, float], None] | None = None) -> dict:
    """Train one epoch in the order fixed by (seed, epoch); returns loss, accuracy and timing.

    ``model`` is a :class:`~qtrain.models.QNet` (its ``qconfig`` picks the loss, its ``qstate``
    counts the steps) or any float ``nn.Module`` (cross-entropy; the peers of
    :mod:`qtrain.peers`); :class:`~qtrain.optim.QSGD` is told the batch size, another optimizer
    steps as usual. ``on_batch(batch_index, loss, accuracy)`` is called after each step
    (progress bars).
    """
    qconfig = getattr(model, "qconfig", None)
    qstate = getattr(model, "qstate", None)
    model.train()
    start = time.perf_counter()
    total_loss = 0.0
    correct = seen = 0
    for i, idx in enumerate(batches(images, labels, batch_size, seed, epoch)):
        x = to_input(images[idx], device)
        y = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
        out = model(x)
        loss = cross_entropy(out, y, qconfig)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if isinstance(optimizer, QSGD):
            optimizer.step(batch_size=len(idx))
        else:
            optimizer.step()
        if qstate is not None:
            qstate.step += 1
        total_loss += float(loss.detach()) * len(idx)
        correct += int((out.argmax(1) == y).sum())
        seen += len(idx)
        if on_batch is not None:
            on_batch(i, total_loss / seen, correct / seen)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen, "train_error": 1 - correct / seen,
            "seconds": seconds, "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 500,
             device="cpu") -> float:
    """Test error (fraction misclassified) in eval mode."""
    model.eval()
    wrong = 0
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], device)
        y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
        wrong += int((model(x).argmax(1) != y).sum())
    return wrong / len(images)
