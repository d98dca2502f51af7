"""Explicit fusion, in the manner of ``torch.ao.quantization.fuse_modules``.

A quantized block ``conv|linear -> Quantize -> L1 batch norm -> ReLU [-> max-pool] -> Quantize``
becomes one :class:`QuantBlock` module, once, when the model is built (:func:`fuse`). It holds
the same modules (so ``print(model)`` shows them, under the block) and, where the int kernels
run them, computes them as one fused autograd node (:func:`qtrain.nn.conv_block`,
:func:`qtrain.nn.linear_block`, :func:`qtrain.nn.quant_bn_relu`): the same integers in fewer
passes. Everywhere else (eval mode, ``emulate`` under :func:`~qtrain.quant.torch_emulation`,
CUDA, an unfused block) it runs the modules one by one.

Hooks: a hook on a block sees the block. A fused block does not call the modules inside it, so
their hooks (and global module hooks) do not fire while it is fused: turn fusion off first,
for one block (``block.fused = False``), for a while (``with unfused(model): ...``), or for
good (:func:`unfuse`, which restores the flat layout and its state-dict keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .nn import (QuantConv2d, QuantLinear, QuantMaxPool2d, _L1BatchNorm, conv_block,
                 linear_block, quant_bn_relu)
from .quant import Quantize


class QuantBlock(nn.Module):
    """``layer -> quant -> bn -> relu [-> pool] -> out`` of a quantized network with L1 batch
    norm, fused where the int kernels run (see the module docstring).

    ``fused`` (public, default True) turns the fused path off for this block. When the fused
    node ran, ``out`` is told that its input holds the norm's ``out_bits`` codes (after ReLU and
    max-pool), so it skips a rounding that would change nothing
    (``Quantize.forward(x, code_bits=...)``); where its backward rounds errors to nearest,
    ``out`` joins the node instead (:func:`qtrain.nn._out_joins`), which rounds the error
    coming back straight to codes.
    """

    def __init__(self, layer: nn.Module, quant: Quantize, bn: _L1BatchNorm, relu: nn.ReLU,
                 pool: nn.Module | None, out: Quantize):
        super().__init__()
        self.layer, self.quant, self.bn, self.relu = layer, quant, bn, relu
        self.pool = pool
        self.out = out
        self.fused = True

    def modules_in_order(self) -> list[nn.Module]:
        return [m for m in (self.layer, self.quant, self.bn, self.relu, self.pool, self.out)
                if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node = None
        if self.fused and isinstance(self.layer, QuantConv2d):
            node = conv_block(self.layer, self.quant, self.bn, self.relu, x, self.pool,
                              self.out)
        elif self.fused and self.pool is None:
            node = linear_block(self.layer, self.quant, self.bn, self.relu, x, self.out)
        if node is None:
            x = self.layer(x)
            if self.fused:
                node = quant_bn_relu(self.quant, self.bn, self.relu, x, self.pool, self.out)
        if node is None:
            for m in self.modules_in_order()[1:]:
                x = m(x)
            return x
        y, pooled, quantized = node
        if self.pool is not None and not pooled:
            y = self.pool(y)  # max-pool selects codes: still the norm's output codes
        return y if quantized else self.out(y, code_bits=self.bn.out_bits)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"


_PATTERN = ((QuantConv2d, QuantLinear), Quantize, _L1BatchNorm, nn.ReLU)


def _block_at(mods: list[nn.Module], i: int) -> QuantBlock | None:
    """The block starting at ``mods[i]``, if the modules from there match the pattern."""
    head = mods[i:i + 4]
    if len(head) < 4 or not all(isinstance(m, t) for m, t in zip(head, _PATTERN)):
        return None
    layer, quant, bn, relu = head
    if not (layer.quantized and bn.quantized):
        return None
    j = i + 4
    pool = None
    if j < len(mods) and isinstance(mods[j], (QuantMaxPool2d, nn.MaxPool2d)):
        pool, j = mods[j], j + 1
    if j >= len(mods) or not isinstance(mods[j], Quantize):
        return None
    return QuantBlock(layer, quant, bn, relu, pool, mods[j])


def _sequentials(model: nn.Module) -> list[nn.Sequential]:
    return [m for m in model.modules() if isinstance(m, nn.Sequential)]


def _refill(seq: nn.Sequential, mods: list[nn.Module]) -> None:
    """Make ``seq`` hold ``mods``, numbered 0, 1, ... as nn.Sequential numbers them."""
    while len(seq):
        del seq[0]
    seq.extend(mods)


def fuse(model: nn.Module) -> nn.Module:
    """Group every quantized L1 block of every ``nn.Sequential`` in ``model`` (nested ones
    included) into a :class:`QuantBlock`, in place; returns ``model``. Idempotent; a network
    with float or L2 batch norm has no such block and is left as it is."""
    for seq in _sequentials(model):
        mods, out, i = list(seq), [], 0
        while i < len(mods):
            block = _block_at(mods, i)
            if block is None:
                out.append(mods[i])
                i += 1
            else:
                out.append(block)
                i += len(block.modules_in_order())
        if len(out) != len(mods):
            _refill(seq, out)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse` in place (each block's modules back in their sequence, state-dict keys
    as before fusing); returns ``model``."""
    for seq in _sequentials(model):
        mods = list(seq)
        if any(isinstance(m, QuantBlock) for m in mods):
            _refill(seq, [n for m in mods
                          for n in (m.modules_in_order() if isinstance(m, QuantBlock) else [m])])
    return model


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Run every block of ``model`` module by module inside the ``with`` (say, to let hooks on
    the modules inside blocks fire); each block's ``fused`` is restored afterwards."""
    blocks = [m for m in model.modules() if isinstance(m, QuantBlock)]
    saved = [b.fused for b in blocks]
    try:
        for b in blocks:
            b.fused = False
        yield model
    finally:
        for b, f in zip(blocks, saved):
            b.fused = f
