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

Codes of 9..16 bits (``|code| <= 32767``) run on the same kernel as two int8 limbs each
(:func:`qkernels.conv.split_limbs`: ``q = 256*hi + lo + off``): a product is the sum of the
four limb products (two where one operand is 8-bit codes), shifted and added in int64, plus
the offset's rank-one terms; every limb product is an exact int32 sum (``|limb| <= 128``, at
most :data:`LIMB_TERMS` terms per piece), so the int64 result is the exact product, and
``col2im`` adds it up in int64. Codes wider than 16 bits, or a container that is not codes,
keep the float path of :mod:`qtrain.nn`: float32 BLAS where a sum provably stays below
``2**24``, float64 otherwise.
The containers a layer makes from integer codes (a fused block's output, the rounded weights,
the input images) carry those codes (:func:`attach`), so the next product takes them without
reading the float32 container back (:func:`codes8`); the record lapses if the container is
changed in place.
Before its first use the GEMM is checked on this machine against int64 arithmetic with the
largest codes (a CPU whose int8 kernel saturates int16 pairs fails it); if the check fails
the float path is used throughout. ``QTRAIN_INT_GEMM=0`` or :func:`float_gemm` selects the
float path on purpose.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

from qkernels.conv import (channels_first, channels_last, col2im, col2im_add, im2col, im2col_as,
                           join_limbs, split_limbs)
from qkernels.format import QTensor
from qkernels.ieee import f32_to_codes_exact
from qkernels.quant import QuantCounts, max_abs, quantize_nearest, quantize_rows

#: Largest code magnitude of an int8 operand (the quantizers' codes are symmetric).
CODE_MAX = 127
#: Longest dot product of int8 codes whose sum provably fits int32.
MAX_TERMS = ((1 << 31) - 1) // (CODE_MAX * CODE_MAX)
#: Widest codes the integer GEMM takes (as two int8 limbs); wider ones take the float path.
WIDE_BITS = 16
#: Longest dot product of int8 limbs (``|limb| <= 128``) whose sum provably fits int32.
LIMB_TERMS = ((1 << 31) - 1) // (128 * 128)

#: ``QTRAIN_INT_GEMM=0`` in the environment switches the integer GEMM off (the float path runs;
#: results are the same bit for bit), e.g. to time it against the float path.
_enabled = os.environ.get("QTRAIN_INT_GEMM", "1") != "0"


class Codes(NamedTuple):
    """int8 (or, for codes of 9..16 bits, int16) codes as a torch tensor with their exponent:
    values ``q * 2**exp``."""

    q: torch.Tensor
    exp: int


class Limbs(NamedTuple):
    """An int16 code matrix as int8 limbs, ready for :func:`matmul`: ``hi * 256 + lo + off``
    (:func:`qkernels.conv.split_limbs`). Split once, a matrix used by two products (a conv's
    columns: forward and weight gradient) is not split twice."""

    hi: torch.Tensor
    lo: torch.Tensor
    off: int

    @classmethod
    def of(cls, q: torch.Tensor) -> Limbs:
        hi, lo, off = split_limbs(q.numpy())
        return cls(torch.from_numpy(hi), torch.from_numpy(lo), off)

    @property
    def shape(self) -> torch.Size:
        return self.hi.shape

    def t(self) -> Limbs:
        return Limbs(self.hi.t(), self.lo.t(), self.off)

    def sum(self, dim: int) -> torch.Tensor:
        """int64 sums of ``hi * 256 + lo`` (without the offset) along ``dim``, kept."""
        total = self.hi.sum(dim, keepdim=True, dtype=torch.int64).mul_(256)
        return total.add_(self.lo.sum(dim, keepdim=True, dtype=torch.int64))


def operand(q: torch.Tensor | Limbs) -> torch.Tensor | Limbs:
    """int8 codes (and :class:`Limbs`) as they are, wider codes as :class:`Limbs`."""
    return q if isinstance(q, Limbs) or q.dtype == torch.int8 else Limbs.of(q.contiguous())


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


#: The attribute under which a float32 container carries the codes it was made from
#: (:func:`attach`).
_HELD = "_qtrain_codes"


def attach(t: torch.Tensor, q: np.ndarray, exp: int, relu: bool = False) -> torch.Tensor:
    """Record on the float32 CPU container ``t`` that it holds the integer codes ``q`` (an
    array of ``t``'s shape) at ``exp`` (with ``relu``: their ``max(q, 0)``), so that
    :func:`codes8` of ``t``, or of a view of all of it in the same order (a flatten, a
    ``view_as``), takes them instead of reading the container again (two passes over a
    float32 tensor: its peak, then its codes). The record lapses when ``t`` is changed in
    place, or through a view: torch's version counter moves. Returns ``t``."""
    base = t._base if _whole_view(t) else t  # kept where every view of it looks
    base.__dict__[_HELD] = (q, exp, relu, t._version)
    return t


def _whole_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of all of its base, in the same order (a reshape, a flatten, a
    ``view_as``)."""
    base = t._base
    return (base is not None and t.is_contiguous() and base.is_contiguous()
            and t.numel() == base.numel() and t.storage_offset() == base.storage_offset())


def _record(t: torch.Tensor) -> tuple | None:
    """The valid record of codes of ``t`` (or of its base, where ``t`` is a whole view of
    it); None without one."""
    held = t.__dict__.get(_HELD)
    if held is None and _whole_view(t):
        held = t._base.__dict__.get(_HELD)
    if held is None or held[3] != t._version:
        return None
    return held


def _held_codes8(t: torch.Tensor) -> Codes | None | bool:
    """:func:`codes8` from ``t``'s record: what reading the container gives (the peak's
    exponent ``E - 7``, the codes shifted to it), False where there is no valid record or its
    codes do not fit int8 (then the container is read)."""
    held = _record(t)
    if held is None:
        return False
    q, exp, relu, _ = held
    q = q.reshape(t.shape)
    if relu:
        q = np.maximum(q, 0)
    peak = max_abs(np.ascontiguousarray(q).reshape(-1))
    if peak == 0:
        return Codes(torch.zeros(q.shape, dtype=torch.int8), 0)
    shift = 7 - peak.bit_length()
    if shift < 0:
        return False
    q8 = q if q.dtype == np.int8 else q.astype(np.int8)
    return Codes(torch.from_numpy(q8 << np.int8(shift) if shift else q8), exp - shift)


def codes8(t: torch.Tensor) -> Codes | None:
    """The int8 codes of a float32 CPU container, or None when it is not codes of at most 8
    bits (then the caller takes the float path). A container's record (:func:`attach`)
    gives them without reading it."""
    if t.dtype != torch.float32:
        return None
    c = _held_codes8(t)
    if c is not False:
        return c
    c = f32_to_codes_exact(t.detach().numpy(), 7, np.int8)
    return None if c is None else Codes(torch.from_numpy(c.q), c.exp)


def codes(t: torch.Tensor, wide: bool) -> Codes | None:
    """:func:`codes8`, or with ``wide`` (a layer whose declared widths pass 8 bits) int16
    codes of at most 16 bits where the container is not 8-bit codes; None when it is neither
    (the float path)."""
    c = codes8(t)
    if c is not None or not wide or t.dtype != torch.float32:
        return c
    c = f32_to_codes_exact(t.detach().numpy(), WIDE_BITS - 1, np.int16)
    return None if c is None else Codes(torch.from_numpy(c.q), c.exp)


def _mm8(a: torch.Tensor, b: torch.Tensor, terms: int) -> torch.Tensor:
    """``a @ b`` of int8 matrices: int32, or int64 sums of int32 pieces of ``terms`` terms."""
    k = a.shape[1]
    if k <= terms:
        return torch._int_mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    for start in range(0, k, terms):
        out += torch._int_mm(a[:, start:start + terms], b[start:start + terms])
    return out


def limb_products(a: torch.Tensor | Limbs, b: torch.Tensor | Limbs) -> list[torch.Tensor]:
    """The limb products of ``a @ b`` (int32, or int64 for very long dot products), for
    :func:`qkernels.conv.join_limbs`: ``hi@hi, hi@lo, lo@hi, lo@lo`` for two wide operands,
    ``hi@b`` and ``lo@b`` (or ``a@hi``, ``a@lo``) for one. Offsets are not included."""
    return [_mm8(pa, pb, LIMB_TERMS) for pa in _parts(a) for pb in _parts(b)]


def _parts(m: torch.Tensor | Limbs) -> tuple[torch.Tensor, ...]:
    return (m.hi, m.lo) if isinstance(m, Limbs) else (m,)


def offset_terms(a: torch.Tensor | Limbs, b: torch.Tensor | Limbs) -> torch.Tensor | None:
    """What :class:`Limbs` offsets add to ``a @ b`` beyond the limb products, as an int64
    matrix (None without offsets): with ``a = a' + oa``, ``b = b' + ob`` elementwise,
    ``a @ b = a' @ b' + oa * (column sums of b') + ob * (row sums of a') + oa * ob * K``."""
    oa = a.off if isinstance(a, Limbs) else 0
    ob = b.off if isinstance(b, Limbs) else 0
    if not (oa or ob):
        return None
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64)
    if oa:
        out.add_(b.sum(0) if isinstance(b, Limbs) else b.sum(0, keepdim=True, dtype=torch.int64),
                 alpha=oa)
    if ob:
        out.add_(a.sum(1) if isinstance(a, Limbs) else a.sum(1, keepdim=True, dtype=torch.int64),
                 alpha=ob)
    return out.add_(oa * ob * a.shape[1])


def matmul(a: torch.Tensor | Limbs, b: torch.Tensor | Limbs) -> torch.Tensor:
    """Exact ``a @ b`` of code matrices (int8 or int16 tensors, or :class:`Limbs`): int32
    for two int8 matrices whose dot products have at most :data:`MAX_TERMS` terms, int64
    otherwise."""
    a, b = operand(a), operand(b)
    if not isinstance(a, Limbs) and not isinstance(b, Limbs):
        return _mm8(a, b, MAX_TERMS)
    out = torch.from_numpy(join_limbs(*(p.numpy() for p in limb_products(a, b))))
    extra = offset_terms(a, b)
    return out if extra is None else out.add_(extra)


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


def _columns(x: Codes, w: Codes, stride, padding
             ) -> tuple[torch.Tensor | Limbs, tuple[int, ...]]:
    """The columns of ``x`` for ``w``'s kernel (int8, or :class:`Limbs` of int16 codes), and
    the output's (N, O, OH, OW)."""
    (n, _, h, wd), (o, _, kh, kw) = x.q.shape, w.q.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
    if x.q.dtype == torch.int8:
        return torch.from_numpy(im2col(x.q.numpy(), (kh, kw), stride, padding)), (n, o, oh, ow)
    cols = im2col_as(x.q.numpy(), (kh, kw), stride, padding, np.int16)
    return Limbs.of(torch.from_numpy(cols)), (n, o, oh, ow)


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
           ) -> tuple[torch.Tensor, torch.Tensor | Limbs]:
    """``conv2d(x, w) [+ bias]`` as a float32 container, and the columns of ``x`` (for the
    weight gradient). ``bias``: codes per output channel (see :func:`with_bias`)."""
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


def requantize_channels(acc: torch.Tensor, exp: int, bits: int) -> tuple[QTensor, QuantCounts]:
    """Accumulators (O, N, ...) at exponent ``exp`` rounded to ``bits`` with one exponent per
    output channel (nearest, each channel's range exponent, never below the tensor's 16-bit
    one: :func:`qkernels.quant.quantize_rows` on the channels as rows), laid out (N, O, ...)
    as int16 codes at that 16-bit exponent: what :func:`qtrain.quant.nearest_channels` and
    the norm's 16-bit codes give on their float32 container when that container is exact."""
    q, counts = quantize_rows(QTensor(acc.numpy(), exp), bits)
    return QTensor(channels_first(q.q), q.exp if q.q.any() else 0), counts


def conv2d_error_codes(gy: torch.Tensor, columns: bool, wide: bool = False) -> Codes | None:
    """The output error (N, O, OH, OW) as a code matrix (int8; int16 with ``wide``, see
    :func:`codes`), or None (not such codes): (N*OH*OW, O) with ``columns`` (both gradients
    then run from it), (O, N*OH*OW) otherwise (measured faster for the weight gradient alone
    of the first layer)."""
    g = codes(gy, wide)
    return None if g is None else error_matrix(g.q.numpy(), g.exp, columns)


def error_matrix(q: np.ndarray, exp: int, columns: bool) -> Codes:
    """Error codes (N, O, OH, OW) in the layout :func:`conv2d_error_codes` describes."""
    o = q.shape[1]
    if columns:
        return Codes(torch.from_numpy(channels_last(q)).reshape(-1, o), exp)
    return Codes(torch.from_numpy(channels_first(q)).reshape(o, -1), exp)


def conv2d_input_applies(g: Codes, w: Codes, stride) -> bool:
    """col2im's sums of ``W.T @ E`` stay exact: int64 where an operand is wide, else int32
    sums of at most ``MAX_TERMS`` products."""
    if g.q.dtype != torch.int8 or w.q.dtype != torch.int8:
        return True
    return _int8_input_sums(w.q.shape, stride, MAX_TERMS)


def _int8_input_sums(w_shape, stride, terms: int = LIMB_TERMS) -> bool:
    """col2im's sums of products of int8 codes (``terms``: :data:`MAX_TERMS`) or limbs fit
    int32."""
    o, _, kh, kw = w_shape
    sh, sw = stride
    return o * -(-kh // sh) * -(-kw // sw) <= terms


def conv2d_input_grad(g: Codes, w: Codes, x_shape, stride, padding) -> torch.Tensor:
    """The input gradient (N, C, H, W) as a float32 container, from errors as (N*OH*OW, O).

    With wide operands and no offsets, each limb product is added back into an image on its
    own (int32 sums: ``conv2d_input_applies`` bounds them as for int8 codes) and the small
    images are joined, instead of joining the large (C*kh*kw, N*OH*OW) products first."""
    o = w.q.shape[0]
    a, b = operand(w.q.reshape(o, -1).t()), operand(g.q.t())  # (C*kh*kw, N*OH*OW) products
    kernel = tuple(w.q.shape[2:])
    if isinstance(a, Limbs) or isinstance(b, Limbs):
        offsets = any(isinstance(m, Limbs) and m.off for m in (a, b))
        if not offsets and _int8_input_sums(w.q.shape, stride):
            images = [col2im(p.numpy(), tuple(x_shape), kernel, stride, padding)
                      for p in limb_products(a, b)]
            return container(torch.from_numpy(join_limbs(*images)), g.exp + w.exp)
        image = col2im(matmul(a, b).numpy(), tuple(x_shape), kernel, stride, padding)
    else:
        image = _input_grad8(a, g.q, tuple(x_shape), kernel, stride, padding)
    return container(torch.from_numpy(image), g.exp + w.exp)


#: Bytes of int32 products that :func:`_input_grad8` makes at a time (they are added into the
#: image while still in cache). 1 MiB measured best in the step on this project's machines
#: (2 MiB of L2 per core): against 4 MiB, 8.86 -> 8.33 ms per ``lenet5`` step and 24.3 -> 23.0
#: ms per ``lenet5-paper`` step, interleaved in one process; 512 KiB and 2 MiB were level or
#: slower.
BLOCK_BYTES = 1 << 20
#: Per thread, the block buffers of :func:`_input_grad8` by shape (at most BLOCK_BYTES each),
#: kept from step to step: a freshly allocated one made the product itself 2x slower here
#: (LeNet-5's second conv: 0.82 -> 0.43 ms median in the step).
_blocks = threading.local()


def _block_buffer(rows: int, cols: int) -> torch.Tensor:
    bufs = _blocks.__dict__.setdefault("bufs", {})
    buf = bufs.get((rows, cols))
    if buf is None:
        buf = bufs[rows, cols] = torch.empty(rows, cols, dtype=torch.int32)
    return buf


def _input_grad8(wt: torch.Tensor, g: torch.Tensor, x_shape, kernel, stride, padding
                 ) -> np.ndarray:
    """``col2im(wt @ g.T)`` for int8 ``wt`` (C*kh*kw, O) and errors ``g`` (N*OH*OW, O), a few
    images at a time: each block's int32 products are added into the image while they are in
    cache, instead of writing and reading back all of the (C*kh*kw, N*OH*OW) products (the
    paper's LeNet's second conv: 26 MB; 3.4 -> 2.2 ms). The sums are the same integers."""
    n = x_shape[0]
    per_image = g.shape[0] // n  # OH*OW error rows per image
    block = max(1, min(n, BLOCK_BYTES // (4 * wt.shape[0] * per_image)))
    image = np.zeros(x_shape, np.int32)
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        rows = g[n0 * per_image:n1 * per_image].t()
        # a last, shorter block has a buffer of its own (a slice would not be contiguous)
        part = torch._int_mm(wt, rows, out=_block_buffer(wt.shape[0], (n1 - n0) * per_image))
        col2im_add(part.numpy(), image[n0:n1], kernel, stride, padding)
    return image


def conv2d_weight_grad(g: Codes, columns: bool, cols: torch.Tensor | Limbs, x_exp: int,
                       w_shape) -> QTensor:
    """The exact weight gradient as integer codes (O, C, kh, kw), from errors in the layout
    :func:`conv2d_error_codes` made with ``columns``."""
    if columns:  # g: (N*OH*OW, O)
        acc = matmul(cols, g.q).t().contiguous()
    else:  # g: (O, N*OH*OW); cols @ g.T measured faster than g @ cols.T (LeNet-5's first
        # layer, (6, 73728) x (73728, 25): 0.27 against 0.44 ms; the paper's, 32 rows: level)
        acc = matmul(cols, g.q.t()).t().contiguous()
    return _grad_codes(acc, g.exp + x_exp, w_shape)


# --- linear --------------------------------------------------------------------------------------


def linear(x: Codes, w: Codes, bias: Codes | None = None) -> torch.Tensor:
    """``x @ w.T [+ bias]`` for x (B, in) as a float32 container (see :func:`with_bias`)."""
    return container(*with_bias(matmul(x.q, w.q.t()), x.exp + w.exp, bias, 1))


def linear_input_grad(g: Codes, w: Codes) -> torch.Tensor:
    return container(matmul(g.q, w.q), g.exp + w.exp)


def linear_weight_grad(g: Codes, x: Codes) -> QTensor:
    return _grad_codes(matmul(g.q.t(), x.q), g.exp + x.exp, (g.q.shape[1], x.q.shape[1]))
