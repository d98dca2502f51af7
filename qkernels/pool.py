"""2x2, stride-2 max-pool on float32 containers of codes (selection only: exact), and fused
with a ReLU on integer codes.

:func:`maxpool2x2` / :func:`maxpool2x2_backward` compare float32 values, as torch's max-pool
does: a comparison selects, it never rounds, so the result is the exact code. (They are on
the reasoned allowlist of ``tests/qkernels/test_no_float.py``: an integer order key on the bit
patterns gave the same results 1.4-1.5x slower.)

:func:`maxpool2x2_relu_codes` / :func:`maxpool2x2_relu_backward_codes` pool ``relu(y)`` for
integer codes ``y`` (a batch norm's output) and send the error back to ``y``'s codes, through
the container's bit patterns: integers only, and the same results as ReLU, max-pool and the
conversions one after the other. :func:`maxpool2x2_relu_backward_of_codes` sends back an
error held as codes (one rounded straight to codes), with the same results as from its
container.

The backward routes each error to the first largest element of its window in row-major order
(a, b / c, d), which is the choice ``torch.nn.functional.max_pool2d`` makes, so the results are
identical to torch's. Parallel over the (N*C) planes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .format import QTensor, check_array, check_qtensor
from .ieee import _ABS, _NO_TOP, _bits_of, _code_at, _top_exponent


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
    all-ones or all-zeros mask, so the loop has no branches (+0.0 where nothing lands). The
    masks flag the first largest of a, b / c, d in row-major order."""
    for p in prange(x.shape[0]):
        for i in range(gy.shape[1]):
            r0 = x[p, 2 * i]
            r1 = x[p, 2 * i + 1]
            g0 = gx[p, 2 * i]
            g1 = gx[p, 2 * i + 1]
            for j in range(gy.shape[2]):
                a, b, c, d = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]
                cd = max(c, d)
                ka = np.int32(a >= b and a >= cd)
                kb = np.int32(b > a and b >= cd)
                kc = (np.int32(1) - ka - kb) * np.int32(c >= d)
                kd = np.int32(1) - ka - kb - kc
                g = gy[p, i, j]
                g0[2 * j] = g & -ka
                g0[2 * j + 1] = g & -kb
                g1[2 * j] = g & -kc
                g1[2 * j + 1] = g & -kd


@njit(cache=True, parallel=True)
def _relu_forward_codes(y, out, sel):
    """Pooled relu(y) codes, and per window the selected element (0..3, row-major) or -1 when
    the window's maximum is a ReLU zero (no error goes back through it). The first largest
    is counted out without branches (a != m, then b != m, then c != m), so the loop
    vectorizes (the paper's LeNet's first block: 0.34 -> 0.22 ms alone)."""
    zero = y.dtype.type(0)
    for p in prange(y.shape[0]):
        for i in range(out.shape[1]):
            r0 = y[p, 2 * i]
            r1 = y[p, 2 * i + 1]
            pooled = out[p, i]
            chosen = sel[p, i]
            for j in range(out.shape[2]):
                a = max(r0[2 * j], zero)
                b = max(r0[2 * j + 1], zero)
                c = max(r1[2 * j], zero)
                d = max(r1[2 * j + 1], zero)
                m = max(max(a, b), max(c, d))
                pooled[j] = m
                k = np.int32(a != m) * (1 + np.int32(b != m) * (1 + np.int32(c != m)))
                chosen[j] = k if m > 0 else -1


@njit(cache=True, inline="always")
def _magnitude(g, bits):
    """An error's magnitude, comparable across one array: from float32 bits (``bits``) the
    bits without the sign, which order as the values do; from a code its absolute value."""
    return np.int64(g & _ABS) if bits else abs(np.int64(g))


@njit(cache=True, parallel=True)
def _relu_backward_peak(sel, gz, bits):
    """Largest magnitude (:func:`_magnitude`) of the errors that go back (windows with a
    selected element)."""
    top = np.int64(0)
    for p in prange(sel.shape[0]):
        for i in range(sel.shape[1]):
            for j in range(sel.shape[2]):
                top = max(top, _magnitude(gz[p, i, j], bits) if sel[p, i, j] >= 0
                          else np.int64(0))
    return top


@njit(cache=True, parallel=True)
def _relu_backward_codes(sel, gz, bits, e, out):
    """Each error's code to its window's selected element, zeros elsewhere: every element of
    ``out`` written once, as the code ANDed with an all-ones or all-zeros mask, without
    branches (0.90 -> 0.58 ms alone on the paper's LeNet's first block, against zeroing the
    planes and then storing the selected elements). The code: float32 bits (``bits``) read at
    exponent ``e``, or a code shifted left by ``e``."""
    for p in prange(sel.shape[0]):
        for i in range(sel.shape[1]):
            o0 = out[p, 2 * i]
            o1 = out[p, 2 * i + 1]
            chosen = sel[p, i]
            g = gz[p, i]
            for j in range(sel.shape[2]):
                k = np.int64(chosen[j])
                code = _code_at(g[j], e) if bits else np.int64(g[j]) << e
                o0[2 * j] = code & -np.int64(k == 0)
                o0[2 * j + 1] = code & -np.int64(k == 1)
                o1[2 * j] = code & -np.int64(k == 2)
                o1[2 * j + 1] = code & -np.int64(k == 3)


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


def maxpool2x2_relu_codes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``maxpool2x2(relu(y))`` for int8/int16 codes ``y`` of shape (C, H, W) or (N, C, H, W)
    with even H and W: codes of the same dtype (and exponent), and the selection the
    backward needs (int8 per window: the first largest element, 0..3 in row-major order, or
    -1 where the maximum is a ReLU zero)."""
    yp = _code_planes(y)
    shape = (yp.shape[0], yp.shape[1] // 2, yp.shape[2] // 2)
    out, sel = np.empty(shape, y.dtype), np.empty(shape, np.int8)
    _relu_forward_codes(yp, out, sel)
    pooled_shape = (*y.shape[:-2], y.shape[-2] // 2, y.shape[-1] // 2)
    return out.reshape(pooled_shape), sel.reshape(pooled_shape)


def maxpool2x2_relu_backward_codes(sel: np.ndarray, gz: np.ndarray, width: int, dtype
                                   ) -> QTensor:
    """The error at ``y`` of :func:`maxpool2x2_relu_codes` as codes: each float32 error of
    ``gz`` goes to its window's selected element (none where ``sel`` is -1), at exponent
    ``E - width`` with ``E`` from the largest error that goes back (0 when none does); shape
    (..., 2H, 2W) for ``sel``'s (..., H, W). The same codes as ``f32_to_codes_where(
    maxpool2x2_backward(relu(y) container, gz), y, width, dtype)``, in two passes over the
    pooled size and one write of ``y``'s, without a float32 error of ``y``'s size."""
    check_array(sel, "sel", (np.int8,), (3, 4))
    b = _bits_of(gz, "gz")
    if gz.shape != sel.shape:
        raise ValueError(f"gz has shape {gz.shape}, expected the pooled shape {sel.shape}")
    sp = np.ascontiguousarray(sel).reshape(-1, *sel.shape[-2:])
    gb = b.reshape(sp.shape)
    top = int(_top_exponent(np.int32(_relu_backward_peak(sp, gb, True))))
    e = 0 if top == _NO_TOP else top - width
    out = np.empty((sp.shape[0], 2 * sp.shape[1], 2 * sp.shape[2]), dtype)
    _relu_backward_codes(sp, gb, True, e, out)
    return QTensor(out.reshape(*sel.shape[:-2], 2 * sel.shape[-2], 2 * sel.shape[-1]), e)


def maxpool2x2_relu_backward_of_codes(sel: np.ndarray, gz: QTensor, width: int, dtype
                                      ) -> QTensor:
    """:func:`maxpool2x2_relu_backward_codes` of errors held as codes (int8 or int16 ``gz.q``
    of ``sel``'s shape at ``gz.exp``, each of at most ``width`` bits): the same codes and
    exponent as from their float32 container, without one. The exponent is ``E - width`` for
    the largest error that goes back, so each code moves left by ``width`` less its bit
    length."""
    check_array(sel, "sel", (np.int8,), (3, 4))
    check_qtensor(gz, "gz")
    check_array(gz.q, "gz.q", (np.int8, np.int16), (sel.ndim,))
    if gz.q.shape != sel.shape:
        raise ValueError(f"gz.q has shape {gz.q.shape}, expected the pooled shape {sel.shape}")
    sp = np.ascontiguousarray(sel).reshape(-1, *sel.shape[-2:])
    gq = np.ascontiguousarray(gz.q).reshape(sp.shape)
    peak = int(_relu_backward_peak(sp, gq, False))
    if peak >> width:
        raise ValueError(f"gz holds a code of {peak.bit_length()} bits, more than width={width}")
    shift = width - peak.bit_length() if peak else 0
    out = np.empty((sp.shape[0], 2 * sp.shape[1], 2 * sp.shape[2]), dtype)
    _relu_backward_codes(sp, gq, False, shift, out)
    shape = (*sel.shape[:-2], 2 * sel.shape[-2], 2 * sel.shape[-1])
    return QTensor(out.reshape(shape), gz.exp - shift if peak else 0)


__all__ = ["maxpool2x2", "maxpool2x2_backward", "maxpool2x2_relu_codes",
           "maxpool2x2_relu_backward_codes", "maxpool2x2_relu_backward_of_codes"]
