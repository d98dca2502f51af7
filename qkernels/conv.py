r"""Integer convolution: the patch layout of an integer matrix product, its adjoint, and the exact
weight gradient of a 2-D convolution on int8 codes.

:func:`im2col` lays the input patches out as the columns of an int8 matrix (``K = C*kh*kw``
rows of ``N*OH*OW`` codes), so that a convolution is one integer matrix product
``W @ cols`` (qtrain's int backend runs it as an int8 x int8 -> int32 GEMM); :func:`col2im`
adds such columns back into an image (the input gradient, from ``W.T @ errors``), and
:func:`channels_first` / :func:`channels_last` lay errors out as ``(O, N*OH*OW)`` or
``(N*OH*OW, O)`` matrices in the same order. These
only move or add integers.

:func:`conv2d_weight_grad` is the torch-free exact weight gradient

.. math:: G[o, c, u, v] = \sum_{n, i, j} E[n, o, i, j]\; X[n, c, i s + u - p, j s + v - p]

(stride ``s``, zero padding ``p``): every ``G[o, k]`` is one long int8 dot product of an error
row and a patch row, int16 products summed in int32 blocks and int64 across blocks, exact for
any number of terms (73,728 for LeNet-5's first layer at batch 128).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._jit import pick, serial_and_parallel
from .format import QTensor, check_array, check_qtensor

#: int8*int8 products (|p| <= 2**14) summed into one int32 partial: 2**16 * 2**14 <= 2**30.
BLOCK = 1 << 16


@njit(cache=True, inline="always")
def _span(k, s, p, n_in, n_out):
    """The outputs i in [lo, hi) whose tap ``k`` reads inside the input: 0 <= i*s + k - p <
    n_in (stride s, padding p, n_out outputs); lo >= hi when there are none."""
    lo = max(0, (p - k + s - 1) // s)
    hi = min(n_out, (n_in - 1 + p - k) // s + 1)
    return lo, max(lo, hi)


@njit(cache=True, parallel=True)
def _im2col(x, kh, kw, sh, sw, ph, pw, oh, ow, out):
    """out[(c*kh + u)*kw + v, (n*oh + i)*ow + j] = x[n, c, i*sh + u - ph, j*sw + v - pw] (or 0).
    (Rows of a conv's columns are short, OW codes: one select per code measured faster than
    :func:`_span`'s three loops.)"""
    n_img, n_ch, h, w = x.shape
    for row in prange(n_ch * kh * kw):
        c = row // (kh * kw)
        u = (row // kw) % kh
        v = row % kw
        dst = out[row]
        for n in range(n_img):
            for i in range(oh):
                y = i * sh + u - ph
                base = (n * oh + i) * ow
                if y < 0 or y >= h:
                    for j in range(ow):
                        dst[base + j] = 0
                    continue
                src = x[n, c, y]
                for j in range(ow):
                    xx = j * sw + v - pw
                    dst[base + j] = src[xx] if 0 <= xx < w else np.int8(0)


@njit(cache=True, parallel=True)
def _col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, out):
    """out[n, c, y, x] += cols[(c*kh + u)*kw + v, (n*oh + i)*ow + j] for every (u, v, i, j)
    with i*sh + u - ph = y and j*sw + v - pw = x (one thread per channel: no write races).
    Indices known to be in range are cast to np.uintp: Numba then skips the wraparound of
    negative indices, and the inner loop vectorizes (1.5x faster than bounds checks per code
    on the paper's LeNet's second conv)."""
    n_img, n_ch, h, w = out.shape
    for c in prange(n_ch):
        for u in range(kh):
            i_lo, i_hi = _span(u, sh, ph, h, oh)
            for v in range(kw):
                j_lo, j_hi = _span(v, sw, pw, w, ow)
                src = cols[(c * kh + u) * kw + v]
                for n in range(n_img):
                    for i in range(i_lo, i_hi):
                        dst = out[n, c, np.uintp(i * sh + u - ph)]
                        base = np.uintp((n * oh + i) * ow)
                        for j in range(j_lo, j_hi):
                            dst[np.uintp(j * sw + v - pw)] += src[base + np.uintp(j)]


@njit(cache=True, parallel=True)
def _rows(e, out):
    """out[o, n, l] = e[n, o, l]."""
    n_img, n_out, size = e.shape
    for o in prange(n_out):
        for n in range(n_img):
            src = e[n, o]
            dst = out[o, n]
            for j in range(size):
                dst[j] = src[j]


@njit(cache=True)
def _dot(a, b):
    total = np.int64(0)
    for start in range(0, a.shape[0], BLOCK):
        ab = a[start:start + BLOCK]
        bb = b[start:start + BLOCK]
        part = np.int32(0)
        for i in range(ab.shape[0]):
            part = np.int32(part + np.int16(ab[i] * bb[i]))
        total += part
    return total


@njit(cache=True, parallel=True)
def _gram(a, b, out):
    n_b = b.shape[0]
    for idx in prange(a.shape[0] * n_b):
        o = idx // n_b
        k = idx % n_b
        out[o, k] = _dot(a[o], b[k])


@njit(cache=True, parallel=True)
def _channels_last(a, out):
    """out[n, l, c] = a[n, c, l]."""
    n_img, n_ch, size = a.shape
    for n in prange(n_img):
        src = a[n]
        dst = out[n]
        for l in range(size):
            for c in range(n_ch):
                dst[l, c] = src[c, l]


def _geometry(shape, kernel_size, stride, padding) -> tuple[int, ...]:
    """(kh, kw, sh, sw, ph, pw, oh, ow) of a convolution of an input of ``shape`` (N, C, H, W)."""
    kh, kw = kernel_size
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel {kernel_size} and stride {stride} must be positive and padding "
                         f"{padding} non-negative")
    oh = (shape[2] + 2 * ph - kh) // sh + 1
    ow = (shape[3] + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kernel_size} with padding {padding} does not fit an input of "
                         f"shape {tuple(shape)}")
    return kh, kw, sh, sw, ph, pw, oh, ow


def im2col(x: np.ndarray, kernel_size: tuple[int, int], stride=1, padding=0) -> np.ndarray:
    """The patches of ``conv2d(x, w, stride, padding)`` as the columns of a matrix.

    Args:
        x: int8 codes (N, C, H, W).
        kernel_size: (kh, kw); ``stride`` and ``padding`` an int or a pair.

    Returns:
        int8 (C*kh*kw, N*OH*OW): column ``(n*OH + i)*OW + j`` holds the window of output
        position (i, j) of image n, in ``w``'s (c, u, v) order, zeros outside the image, so
        that ``conv2d(x, w)`` is ``w.reshape(O, -1) @ cols`` with columns in (n, i, j) order.
    """
    check_array(x, "x", (np.int8,), (4,))
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(x.shape, kernel_size, stride, padding)
    n_img, n_ch = x.shape[:2]
    out = np.empty((n_ch * kh * kw, n_img * oh * ow), dtype=np.int8)
    _im2col(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, oh, ow, out)
    return out


def im2col_as(x: np.ndarray, kernel_size: tuple[int, int], stride=1, padding=0,
              dtype=np.float32) -> np.ndarray:
    """:func:`im2col` of int8, int16 or int32 codes into a matrix of ``dtype`` (float32 or
    float64 for an exact BLAS product, or an integer type wide enough), in one pass."""
    check_array(x, "x", (np.int8, np.int16, np.int32), (4,))
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(x.shape, kernel_size, stride, padding)
    n_img, n_ch = x.shape[:2]
    out = np.empty((n_ch * kh * kw, n_img * oh * ow), dtype=dtype)
    _im2col(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, oh, ow, out)
    return out


def col2im(cols: np.ndarray, shape: tuple[int, int, int, int], kernel_size: tuple[int, int],
           stride=1, padding=0) -> np.ndarray:
    """The adjoint of :func:`im2col`: every column's entries added back at the input positions
    they were read from (``w.reshape(O, -1).T @ errors`` becomes the input gradient).

    Args:
        cols: int32 or int64 (C*kh*kw, N*OH*OW).
        shape: the input's (N, C, H, W).

    Returns:
        (N, C, H, W) of ``cols``' dtype. Each element is a sum of at most
        ``ceil(kh/sh)*ceil(kw/sw)`` entries of ``cols``; the caller keeps that sum inside the
        dtype.
    """
    check_array(cols, "cols", (np.int32, np.int64), (2,))
    return col2im_add(cols, np.zeros(tuple(shape), cols.dtype), kernel_size, stride, padding)


def col2im_add(cols: np.ndarray, out: np.ndarray, kernel_size: tuple[int, int], stride=1,
               padding=0) -> np.ndarray:
    """:func:`col2im` added into ``out`` (N, C, H, W), a C-contiguous array of ``cols``'
    dtype, in place (and returned): a batch's input gradient can be built from the columns
    of a few images at a time (``out[n0:n1]``)."""
    check_array(cols, "cols", (np.int32, np.int64), (2,))
    check_array(out, "out", (cols.dtype.type,), (4,))
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (col2im_add writes into it)")
    shape = out.shape
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(shape, kernel_size, stride, padding)
    n_img, n_ch = shape[:2]
    if cols.shape != (n_ch * kh * kw, n_img * oh * ow):
        raise ValueError(f"cols has shape {cols.shape}, expected "
                         f"{(n_ch * kh * kw, n_img * oh * ow)} for an input of shape "
                         f"{tuple(shape)}, kernel {kernel_size}, stride {stride}, padding "
                         f"{padding}")
    _col2im(np.ascontiguousarray(cols), kh, kw, sh, sw, ph, pw, oh, ow, out)
    return out


def _split_limbs(a, off, hi, lo):
    for i in prange(a.shape[0]):
        v = np.int32(a[i]) - off
        h = (v + 128) >> 8
        hi[i] = h
        lo[i] = v - (h << 8)


_split_limbs_s, _split_limbs_p = serial_and_parallel(_split_limbs)


#: The largest int16 code whose high limb fits int8 without an offset (``127*256 + 127``).
LIMB_PEAK = 127 * 256 + 127


def split_limbs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes of up to 16 bits as two int8 limbs, for products on an int8 x int8 -> int32 GEMM.

    Returns ``(hi, lo, off)`` with ``a == 256 * hi + lo + off`` exactly, ``lo`` in -128..127,
    ``hi`` in -128..127, both int8 of ``a``'s shape (contiguous). ``off`` is 0, or 128 when a
    code exceeds :data:`LIMB_PEAK` (two int8 limbs span -32896..32639, not the symmetric
    16-bit range up to 32767; moving every code down by 128 brings it inside). A product
    ``A @ B`` is then the sum of four limb products, shifted, plus ``off`` times the other
    operand's sums (``qtrain.intgemm``).
    """
    check_array(a, "a", (np.int8, np.int16), tuple(range(1, 9)))
    flat = np.ascontiguousarray(a).reshape(-1)
    off = 128 if flat.size and int(flat.max()) > LIMB_PEAK else 0
    hi = np.empty(flat.shape, dtype=np.int8)
    lo = np.empty(flat.shape, dtype=np.int8)
    pick(_split_limbs_s, _split_limbs_p, flat.size)(flat, off, hi, lo)
    return hi.reshape(a.shape), lo.reshape(a.shape), off


def _join4(hh, hl, lh, ll, out):
    for i in prange(out.shape[0]):
        out[i] = (np.int64(hh[i]) << 16) + ((np.int64(hl[i]) + np.int64(lh[i])) << 8) \
            + np.int64(ll[i])


def _join2(h, l, out):
    for i in prange(out.shape[0]):
        out[i] = (np.int64(h[i]) << 8) + np.int64(l[i])


_join4_s, _join4_p = serial_and_parallel(_join4)
_join2_s, _join2_p = serial_and_parallel(_join2)


def join_limbs(*products: np.ndarray) -> np.ndarray:
    """The int64 product of two matrices split by :func:`split_limbs` (offsets aside), from
    their limb products ``(hi@hi, hi@lo, lo@hi, lo@lo)``: ``hh*2**16 + (hl + lh)*2**8 + ll``;
    or, where one operand is int8 codes, from ``(hi@b, lo@b)``: ``h*2**8 + l``. One pass; the
    products are int32 or int64 arrays of one shape."""
    if len(products) not in (2, 4):
        raise ValueError(f"join_limbs takes 2 or 4 limb products, not {len(products)}")
    shape = products[0].shape
    flat = []
    for i, p in enumerate(products):
        check_array(p, f"products[{i}]", (np.int32, np.int64), (p.ndim,))
        if p.shape != shape:
            raise ValueError(f"limb products have shapes {shape} and {p.shape}")
        flat.append(np.ascontiguousarray(p).reshape(-1))
    out = np.empty(flat[0].shape, dtype=np.int64)
    kernels = (_join4_s, _join4_p) if len(flat) == 4 else (_join2_s, _join2_p)
    pick(*kernels, out.size)(*flat, out)
    return out.reshape(shape)


def channels_first(a: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N, ...), contiguous: an (N, O, OH, OW) error as the rows of an
    (O, N*OH*OW) matrix whose columns follow :func:`im2col`'s order."""
    check_array(a, "a", (np.int8, np.int16, np.int32), tuple(range(2, 9)))
    src = np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)
    out = np.empty((a.shape[1], a.shape[0], src.shape[2]), dtype=a.dtype)
    _rows(src, out)
    return out.reshape((a.shape[1], a.shape[0]) + a.shape[2:])


def channels_last(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C), contiguous: an error as an (N*OH*OW, O) matrix whose rows
    follow :func:`im2col`'s column order."""
    check_array(a, "a", (np.int8, np.int16, np.int32), tuple(range(2, 9)))
    src = np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)
    out = np.empty((a.shape[0], src.shape[2], a.shape[1]), dtype=a.dtype)
    _channels_last(src, out)
    return out.reshape((a.shape[0],) + a.shape[2:] + (a.shape[1],))


def conv2d_weight_grad(x: QTensor, e: QTensor, kernel_size: tuple[int, int], stride: int = 1,
                       padding: int = 0) -> QTensor:
    """Exact weight gradient of ``conv2d(x, w, stride, padding)`` for output errors ``e``.

    Args:
        x: input codes, int8 (N, C, H, W), with exponent.
        e: output-error codes, int8 (N, O, OH, OW), with exponent.
        kernel_size: (kh, kw).

    Returns:
        int64 codes (O, C, kh, kw) with exponent ``x.exp + e.exp``.
    """
    check_qtensor(x, "x")
    check_qtensor(e, "e")
    check_array(x.q, "x.q", (np.int8,), (4,))
    check_array(e.q, "e.q", (np.int8,), (4,))
    kh, kw, sh, sw, ph, pw, oh, ow = _geometry(x.q.shape, kernel_size, stride, padding)
    n_img, n_ch = x.q.shape[:2]
    if e.q.shape[0] != n_img or e.q.shape[2:] != (oh, ow):
        raise ValueError(f"e.q has shape {e.q.shape}, expected (N={n_img}, O, {oh}, {ow}) for "
                         f"x {x.q.shape}, kernel {kernel_size}, stride {stride}, padding "
                         f"{padding}")
    cols = im2col(x.q, kernel_size, stride, padding)
    rows = channels_first(e.q).reshape(e.q.shape[1], -1)
    out = np.empty((e.q.shape[1], n_ch * kh * kw), dtype=np.int64)
    _gram(rows, cols, out)
    return QTensor(out.reshape(e.q.shape[1], n_ch, kh, kw), x.exp + e.exp)
