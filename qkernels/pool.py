"""2x2, stride-2 max-pool on float32 containers of codes (selection only: exact), and fused
with a ReLU on integer codes.

:func:`maxpool2x2` / :func:`maxpool2x2_backward` compare float32 values, as torch's max-pool
does: a comparison selects, it never rounds, so the result is the exact code. (They are not
among the integer kernels that ``tests/qkernels/test_no_float.py`` checks.)

:func:`maxpool2x2_relu_codes` / :func:`maxpool2x2_relu_backward_codes` pool ``relu(y)`` for
integer codes ``y`` (a batch norm's output) and send the error back to ``y``'s codes, through
the container's bit patterns: integers only, and the same results as ReLU, max-pool and the
conversions one after the other.

The backward routes each error to the first largest element of its window in row-major order
(a, b / c, d), which is the choice ``torch.nn.functional.max_pool2d`` makes, so the results are
identical to torch's. One pass each way, parallel over the (N*C) planes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .format import QTensor, check_array
from .ieee import _ABS, _NO_TOP, _bits_of, _code_at, _top_exponent


@njit(cache=True, inline="always")
def _first_max(a, b, c, d):
    """0/1 flags of the first largest of a, b / c, d in row-major order."""
    cd = max(c, d)
    ka = np.int32(a >= b and a >= cd)
    kb = np.int32(b > a and b >= cd)
    kc = (np.int32(1) - ka - kb) * np.int32(c >= d)
    return ka, kb, kc, np.int32(1) - ka - kb - kc


@njit(cache=True, parallel=True)
def _forward(x, y):
    for p in prange(x.shape[0]):
        for i in range(y.shape[1]):
            r0 = x[p, 2 * i]
            r1 = x[p, 2 * i + 1]
            out = y[p, i]
            for j in range(y.shape[2]):
                m = r0[2 * j]
                m = r0[2 * j + 1] if r0[2 * j + 1] > m else m
                m = r1[2 * j] if r1[2 * j] > m else m
                m = r1[2 * j + 1] if r1[2 * j + 1] > m else m
                out[j] = m


@njit(cache=True, parallel=True)
def _backward(x, gy, gx):
    """``gy`` and ``gx`` as int32 bit patterns: each output is the error's bits ANDed with an
    all-ones or all-zeros mask, so the loop has no branches (+0.0 where nothing lands)."""
    for p in prange(x.shape[0]):
        for i in range(gy.shape[1]):
            r0 = x[p, 2 * i]
            r1 = x[p, 2 * i + 1]
            g0 = gx[p, 2 * i]
            g1 = gx[p, 2 * i + 1]
            for j in range(gy.shape[2]):
                ka, kb, kc, kd = _first_max(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1])
                g = gy[p, i, j]
                g0[2 * j] = g & -ka
                g0[2 * j + 1] = g & -kb
                g1[2 * j] = g & -kc
                g1[2 * j + 1] = g & -kd


@njit(cache=True, parallel=True)
def _relu_forward_codes(y, out):
    zero = y.dtype.type(0)
    for p in prange(y.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[p, i, j] = max(max(y[p, 2 * i, 2 * j], y[p, 2 * i, 2 * j + 1]),
                                   max(y[p, 2 * i + 1, 2 * j], y[p, 2 * i + 1, 2 * j + 1]),
                                   zero)


@njit(cache=True, parallel=True)
def _relu_backward_peak(y, gz):
    """Largest magnitude bits of the errors that reach y: those of windows whose maximum is
    positive (elsewhere the selected element is a ReLU zero)."""
    top = np.int32(0)
    for p in prange(y.shape[0]):
        for i in range(gz.shape[1]):
            for j in range(gz.shape[2]):
                m = max(max(y[p, 2 * i, 2 * j], y[p, 2 * i, 2 * j + 1]),
                        max(y[p, 2 * i + 1, 2 * j], y[p, 2 * i + 1, 2 * j + 1]))
                top = max(top, gz[p, i, j] & _ABS if m > 0 else np.int32(0))
    return top


@njit(cache=True, parallel=True)
def _relu_backward_codes(y, gz, e, out):
    zero = y.dtype.type(0)
    for p in prange(y.shape[0]):
        for i in range(gz.shape[1]):
            for j in range(gz.shape[2]):
                a = max(y[p, 2 * i, 2 * j], zero)
                b = max(y[p, 2 * i, 2 * j + 1], zero)
                c = max(y[p, 2 * i + 1, 2 * j], zero)
                d = max(y[p, 2 * i + 1, 2 * j + 1], zero)
                g = _code_at(gz[p, i, j], e) if max(max(a, b), max(c, d)) > 0 else 0
                ka, kb, kc, kd = _first_max(a, b, c, d)
                out[p, 2 * i, 2 * j] = g * ka
                out[p, 2 * i, 2 * j + 1] = g * kb
                out[p, 2 * i + 1, 2 * j] = g * kc
                out[p, 2 * i + 1, 2 * j + 1] = g * kd


def _planes(a: np.ndarray, name: str) -> np.ndarray:
    check_array(a, name, (np.float32,), (3, 4))
    if a.shape[-1] % 2 or a.shape[-2] % 2:
        raise ValueError(f"{name} needs an even height and width, got shape {a.shape}")
    return np.ascontiguousarray(a).reshape(-1, a.shape[-2], a.shape[-1])


def maxpool2x2(x: np.ndarray) -> np.ndarray:
    """y[..., i, j] = max of x[..., 2i:2i+2, 2j:2j+2] for a float32 (C, H, W) or (N, C, H, W)
    array with even H and W."""
    xp = _planes(x, "x")
    y = np.empty((xp.shape[0], xp.shape[1] // 2, xp.shape[2] // 2), np.float32)
    _forward(xp, y)
    return y.reshape(*x.shape[:-2], x.shape[-2] // 2, x.shape[-1] // 2)


def maxpool2x2_backward(x: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The error of :func:`maxpool2x2`'s input: each ``gy`` to its window's first largest
    element (row-major), zeros elsewhere."""
    xp = _planes(x, "x")
    check_array(gy, "gy", (np.float32,), (x.ndim,))
    if gy.shape != (*x.shape[:-2], x.shape[-2] // 2, x.shape[-1] // 2):
        raise ValueError(f"gy has shape {gy.shape}, expected the pooled shape of x {x.shape}")
    gx = np.empty_like(xp)
    gy_bits = np.ascontiguousarray(gy).reshape(xp.shape[0], *gy.shape[-2:]).view(np.int32)
    _backward(xp, gy_bits, gx.view(np.int32))
    return gx.reshape(x.shape)


def _code_planes(y: np.ndarray) -> np.ndarray:
    check_array(y, "y", (np.int8, np.int16), (3, 4))
    if y.shape[-1] % 2 or y.shape[-2] % 2:
        raise ValueError(f"y needs an even height and width, got shape {y.shape}")
    return np.ascontiguousarray(y).reshape(-1, y.shape[-2], y.shape[-1])


def maxpool2x2_relu_codes(y: np.ndarray) -> np.ndarray:
    """``maxpool2x2(relu(y))`` for int8/int16 codes ``y`` of shape (C, H, W) or (N, C, H, W)
    with even H and W: codes of the same dtype (and exponent)."""
    yp = _code_planes(y)
    out = np.empty((yp.shape[0], yp.shape[1] // 2, yp.shape[2] // 2), y.dtype)
    _relu_forward_codes(yp, out)
    return out.reshape(*y.shape[:-2], y.shape[-2] // 2, y.shape[-1] // 2)


def maxpool2x2_relu_backward_codes(y: np.ndarray, gz: np.ndarray, width: int, dtype) -> QTensor:
    """The error at ``y`` of :func:`maxpool2x2_relu_codes` as codes: each float32 error of
    ``gz`` (the pooled shape) goes to its window's first largest ``relu(y)`` element unless
    that is a ReLU zero, at exponent ``E - width`` with ``E`` from the largest error that
    arrives (0 when none does). The same codes as ``f32_to_codes_where(maxpool2x2_backward(
    relu(y) container, gz), y, width, dtype)``, in two passes over ``y`` without a float32
    error of ``y``'s size."""
    yp = _code_planes(y)
    b = _bits_of(gz, "gz")
    if gz.shape != (*y.shape[:-2], y.shape[-2] // 2, y.shape[-1] // 2):
        raise ValueError(f"gz has shape {gz.shape}, expected the pooled shape of y {y.shape}")
    gb = b.reshape(yp.shape[0], yp.shape[1] // 2, yp.shape[2] // 2)
    top = int(_top_exponent(_relu_backward_peak(yp, gb)))
    e = 0 if top == _NO_TOP else top - width
    out = np.empty(yp.shape, dtype)
    _relu_backward_codes(yp, gb, e, out)
    return QTensor(out.reshape(y.shape), e)


__all__ = ["maxpool2x2", "maxpool2x2_backward", "maxpool2x2_relu_codes",
           "maxpool2x2_relu_backward_codes"]
