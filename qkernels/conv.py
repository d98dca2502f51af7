r"""Exact integer weight gradient of a 2-D convolution on int8 codes.

.. math:: G[o, c, u, v] = \sum_{n, i, j} E[n, o, i, j]\; X[n, c, i s + u - p, j s + v - p]

(stride ``s``, zero padding ``p``). The sum runs over ``N*OH*OW`` terms (73,728 for LeNet-5's
first layer at batch 128), too many for a float32 BLAS call to be provably exact, so it is
computed in integers: the input patches are laid out as rows (im2col, ``K = C*kh*kw`` rows of
``N*OH*OW`` int8 codes), the errors as ``O`` such rows, and every ``G[o, k]`` is one long
int8 dot product with int16 products summed in int32 blocks and int64 across blocks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .format import QTensor, check_array, check_qtensor

#: int8*int8 products (|p| <= 2**14) summed into one int32 partial: 2**16 * 2**14 <= 2**30.
BLOCK = 1 << 16


@njit(cache=True, parallel=True)
def _im2col(x, kh, kw, stride, pad, oh, ow, out):
    """out[(c*kh + u)*kw + v, (n*oh + i)*ow + j] = x[n, c, i*s + u - p, j*s + v - p] (or 0)."""
    n_img, n_ch, h, w = x.shape
    for row in prange(n_ch * kh * kw):
        c = row // (kh * kw)
        u = (row // kw) % kh
        v = row % kw
        dst = out[row]
        for n in range(n_img):
            for i in range(oh):
                y = i * stride + u - pad
                base = (n * oh + i) * ow
                if y < 0 or y >= h:
                    for j in range(ow):
                        dst[base + j] = 0
                    continue
                src = x[n, c, y]
                for j in range(ow):
                    xx = j * stride + v - pad
                    dst[base + j] = src[xx] if 0 <= xx < w else np.int8(0)


@njit(cache=True, parallel=True)
def _rows(e, out):
    """out[o, (n*oh + i)*ow + j] = e[n, o, i, j]."""
    n_img, n_out, oh, ow = e.shape
    for o in prange(n_out):
        dst = out[o]
        for n in range(n_img):
            for i in range(oh):
                base = (n * oh + i) * ow
                src = e[n, o, i]
                for j in range(ow):
                    dst[base + j] = src[j]


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
    kh, kw = kernel_size
    n_img, n_ch, h, w = x.q.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    if e.q.shape[0] != n_img or e.q.shape[2:] != (oh, ow):
        raise ValueError(f"e.q has shape {e.q.shape}, expected (N={n_img}, O, {oh}, {ow}) for "
                         f"x {x.q.shape}, kernel {kernel_size}, stride {stride}, padding "
                         f"{padding}")
    cols = np.empty((n_ch * kh * kw, n_img * oh * ow), dtype=np.int8)
    _im2col(np.ascontiguousarray(x.q), kh, kw, stride, padding, oh, ow, cols)
    rows = np.empty((e.q.shape[1], n_img * oh * ow), dtype=np.int8)
    _rows(np.ascontiguousarray(e.q), rows)
    out = np.empty((e.q.shape[1], n_ch * kh * kw), dtype=np.int64)
    _gram(rows, cols, out)
    return QTensor(out.reshape(e.q.shape[1], n_ch, kh, kw), x.exp + e.exp)
