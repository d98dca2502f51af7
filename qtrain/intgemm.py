r"""Integer GEMM of the ``int`` backend: the three products of a conv or linear layer (forward,
input gradient, weight gradient) as int8 x int8 -> int32 matrix products.

A layer's operands arrive as float32 containers of codes (``code * 2**e``). When both operands
of a product are codes of at most 8 bits (``|code| <= 127``; checked while converting, not
assumed), they become int8 matrices and ``torch._int_mm`` multiplies them (oneDNN's s8s8s32
kernel: AVX-512 VNNI on this project's machines). Every product is exact:

* a dot product of ``K`` such codes is at most ``K * 127**2`` in magnitude, inside int32 while
  ``K <= MAX_TERMS`` (133,143); longer dot products are split into pieces of ``MAX_TERMS``
  terms whose int32 results are added in int64;
* a convolution is ``W @ im2col(x)`` (:mod:`qkernels.conv`; the columns are kept for the
  weight gradient ``E @ cols.T``); the input gradient is ``col2im(W.T @ E)``, whose int32 sums
  hold at most ``O * ceil(kh/sh) * ceil(kw/sw)`` products.

The int32 results become float32 containers again by torch's int -> float conversion (round to
nearest even: the same float32 the float64 sum of the float path rounds to), or, for weight
gradients, stay integer codes for the stochastic rounding. So the results are those of the
float path bit for bit (``tests/qtrain/test_intgemm.py``).

Wider codes (9..16 bits, or a container that is not int8 codes) keep the float path of
:mod:`qtrain.nn`: float32 BLAS where a sum provably stays below ``2**24``, float64 otherwise.
Before its first use the GEMM is checked on this machine against int64 arithmetic with the
largest codes (a CPU whose int8 kernel saturates int16 pairs fails it); if the check fails
the float path is used throughout. ``QTRAIN_INT_GEMM=0`` or :func:`float_gemm` selects the
float path on purpose.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from qkernels.conv import channels_first, channels_last, col2im, im2col
from qkernels.format import QTensor
from qkernels.ieee import f32_to_codes_exact
from qkernels.quant import QuantCounts, quantize_nearest

#: Largest code magnitude of an int8 operand (the quantizers' codes are symmetric).
CODE_MAX = 127
#: Longest dot product of int8 codes whose sum provably fits int32.
MAX_TERMS = ((1 << 31) - 1) // (CODE_MAX * CODE_MAX)

#: ``QTRAIN_INT_GEMM=0`` in the environment switches the integer GEMM off (the float path runs;
#: results are the same bit for bit), e.g. to time it against the float path.
_enabled = os.environ.get("QTRAIN_INT_GEMM", "1") != "0"


class Codes(NamedTuple):
    """int8 codes as a torch tensor with their exponent: values ``q * 2**exp``."""

    q: torch.Tensor
    exp: int


@contextmanager
def float_gemm():
    """Within this block conv and linear layers use the float path (for comparisons)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@functools.cache
def _int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` computes exact int32 products here, extreme codes included."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(-CODE_MAX, CODE_MAX + 1, (37, 1000), generator=g, dtype=torch.int8)]
    for sign in (1, -1):
        cases.append(torch.full((32, 1000), sign * CODE_MAX, dtype=torch.int8))
    b = torch.randint(-CODE_MAX, CODE_MAX + 1, (1000, 19), generator=g, dtype=torch.int8)
    b[:, :8] = CODE_MAX
    b[:, 8:16] = -CODE_MAX
    try:
        return all(torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) for a in cases)
    except RuntimeError:  # no int8 kernel for this build or CPU
        return False


def enabled() -> bool:
    """Whether the integer GEMM runs (exact on this machine, not switched off)."""
    return _enabled and _int_mm_exact()


def codes8(t: torch.Tensor) -> Codes | None:
    """The int8 codes of a float32 CPU container, or None when it is not codes of at most 8
    bits (then the caller takes the float path)."""
    if t.dtype != torch.float32:
        return None
    c = f32_to_codes_exact(t.detach().numpy(), 7, np.int8)
    return None if c is None else Codes(torch.from_numpy(c.q), c.exp)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices: int32, or int64 when the dot products are longer than
    :data:`MAX_TERMS`."""
    k = a.shape[1]
    if k <= MAX_TERMS:
        return torch._int_mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for start in range(0, k, MAX_TERMS):
        out += torch._int_mm(a[:, start:start + MAX_TERMS], b[start:start + MAX_TERMS])
    return out


def container(acc: torch.Tensor, exp: int) -> torch.Tensor:
    """float32 container of integer results at exponent ``exp`` (rounded to nearest even where
    a result has more than 24 significant bits, as the float path's float64 -> float32)."""
    out = torch.empty(acc.shape, dtype=torch.float32)
    out.copy_(acc)
    return out.mul_(2.0 ** exp) if exp else out


def _grad_codes(acc: torch.Tensor, exp: int, shape) -> QTensor:
    return QTensor(acc.reshape(shape).numpy(), exp)


# --- convolution --------------------------------------------------------------------------------


def conv_applies(layer) -> bool:
    """The layer's geometry is one this path computes (zero padding given as numbers, no
    dilation or groups)."""
    return (layer.groups == 1 and tuple(layer.dilation) == (1, 1)
            and not isinstance(layer.padding, str) and layer.padding_mode == "zeros")


def _columns(x: Codes, w: Codes, stride, padding) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The int8 columns of ``x`` for ``w``'s kernel, and the output's (N, O, OH, OW)."""
    (n, _, h, wd), (o, _, kh, kw) = x.q.shape, w.q.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
    return torch.from_numpy(im2col(x.q.numpy(), (kh, kw), stride, padding)), (n, o, oh, ow)


def with_bias(acc: torch.Tensor, exp: int, bias: Codes | None, channel_dim: int
              ) -> tuple[torch.Tensor, int]:
    """Accumulators at ``exp`` plus per-channel bias codes (integers of any dtype) at
    ``bias.exp``: int64 sums at ``bias.exp`` (as they are without a bias). The accumulators
    move onto the bias's grid exactly: left, or right where ``bias.exp`` is the whole batch's
    coarser grid in a synchronized step (this process's operands then lie on that grid, being
    roundings there, so the bits shifted out are zeros)."""
    if bias is None:
        return acc, exp
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    up = exp - bias.exp
    acc = acc.long() << up if up >= 0 else acc.long() >> -up
    return acc + bias.q.to(torch.int64).view(shape), bias.exp


def conv2d(x: Codes, w: Codes, stride, padding, bias: Codes | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv2d(x, w) [+ bias]`` as a float32 container, and the int8 columns of ``x`` (for
    the weight gradient). ``bias``: codes per output channel (see :func:`with_bias`)."""
    cols, (n, o, oh, ow) = _columns(x, w, stride, padding)
    w2 = w.q.reshape(o, -1)
    if w2.shape[1] < o:  # short dot products (a first layer): (N*OH*OW, O) measured faster
        acc = matmul(cols.t(), w2.t()).view(n, oh, ow, o).permute(0, 3, 1, 2)
    else:
        acc = matmul(w2, cols).view(o, n, oh, ow).transpose(0, 1)  # from (O, N*OH*OW)
    return container(*with_bias(acc, x.exp + w.exp, bias, 1)), cols


def conv2d_acc(x: Codes, w: Codes, stride, padding) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact accumulators of ``conv2d(x, w)`` as integers laid out (O, N, OH, OW), and the
    int8 columns of ``x``."""
    cols, (n, o, oh, ow) = _columns(x, w, stride, padding)
    return matmul(w.q.reshape(o, -1), cols).view(o, n, oh, ow), cols


def top_exponent(acc: torch.Tensor, exp: int) -> int | None:
    """``E`` with ``max|acc| * 2**exp < 2**E`` for integer accumulators, None if all zero."""
    if acc.numel() == 0:
        return None
    lo, hi = torch.aminmax(acc)
    peak = max(-int(lo), int(hi))
    return exp + peak.bit_length() if peak else None


def requantize(acc: torch.Tensor, exp: int, bits: int, dtype, width: int,
               round_exp: int | None = None) -> tuple[QTensor, QuantCounts]:
    """Accumulators (O, N, ...) at exponent ``exp`` rounded to ``bits`` (nearest, range
    exponent or ``round_exp``, saturated, counted) and laid out (N, O, ...) as codes filling ``width`` bits of
    ``dtype``: what a ``Quantize`` and :func:`qkernels.ieee.quantize_f32_to_codes` give on
    their float32 container when that container is exact (sums below ``2**24``)."""
    q, counts = quantize_nearest(QTensor(acc.numpy(), exp), bits, round_exp)
    codes = channels_first(q.q).astype(dtype, copy=False)
    up = width - (bits - 1)
    if up:
        codes <<= up
    return QTensor(codes, q.exp - up if codes.any() else 0), counts  # all zero: exponent 0


def conv2d_error_codes(gy: torch.Tensor, columns: bool) -> Codes | None:
    """The output error (N, O, OH, OW) as an int8 matrix, or None (not 8-bit codes):
    (N*OH*OW, O) with ``columns`` (both gradients then run from it), (O, N*OH*OW) otherwise
    (measured faster for the weight gradient alone of the first layer)."""
    g = codes8(gy)
    return None if g is None else error_matrix(g.q.numpy(), g.exp, columns)


def error_matrix(codes: np.ndarray, exp: int, columns: bool) -> Codes:
    """int8 error codes (N, O, OH, OW) in the layout :func:`conv2d_error_codes` describes."""
    o = codes.shape[1]
    if columns:
        return Codes(torch.from_numpy(channels_last(codes)).reshape(-1, o), exp)
    return Codes(torch.from_numpy(channels_first(codes)).reshape(o, -1), exp)


def conv2d_input_applies(w_shape, stride) -> bool:
    """col2im's int32 sums of ``W.T @ E`` hold at most ``MAX_TERMS`` products."""
    o, _, kh, kw = w_shape
    sh, sw = stride
    return o * -(-kh // sh) * -(-kw // sw) <= MAX_TERMS


def conv2d_input_grad(g: Codes, w: Codes, x_shape, stride, padding) -> torch.Tensor:
    """The input gradient (N, C, H, W) as a float32 container, from errors as (N*OH*OW, O)."""
    o = w.q.shape[0]
    acc = matmul(w.q.reshape(o, -1).t(), g.q.t())  # (C*kh*kw, N*OH*OW)
    image = col2im(acc.numpy(), tuple(x_shape), tuple(w.q.shape[2:]), stride, padding)
    return container(torch.from_numpy(image), g.exp + w.exp)


def conv2d_weight_grad(g: Codes, columns: bool, cols: torch.Tensor, x_exp: int, w_shape
                       ) -> QTensor:
    """The exact weight gradient as integer codes (O, C, kh, kw), from errors in the layout
    :func:`conv2d_error_codes` made with ``columns``."""
    if columns:  # g: (N*OH*OW, O)
        acc = matmul(cols, g.q).t().contiguous()
    else:  # g: (O, N*OH*OW)
        acc = matmul(g.q, cols.t())
    return _grad_codes(acc, g.exp + x_exp, w_shape)


# --- linear --------------------------------------------------------------------------------------


def linear(x: Codes, w: Codes, bias: Codes | None = None) -> torch.Tensor:
    """``x @ w.T [+ bias]`` for x (B, in) as a float32 container (see :func:`with_bias`)."""
    return container(*with_bias(matmul(x.q, w.q.t()), x.exp + w.exp, bias, 1))


def linear_input_grad(g: Codes, w: Codes) -> torch.Tensor:
    return container(matmul(g.q, w.q), g.exp + w.exp)


def linear_weight_grad(g: Codes, x: Codes) -> QTensor:
    return _grad_codes(matmul(g.q.t(), x.q), g.exp + x.exp, (g.q.shape[1], x.q.shape[1]))
