"""2x2, stride-2 max-pool on float32 containers of codes (selection only: exact).

These kernels compare float32 values, as torch's max-pool does: a comparison selects, it
never rounds, so the result is the exact code. (They are not among the integer kernels that
``tests/qkernels/test_no_float.py`` checks.)

The backward routes each error to the first largest element of its window in row-major order
(a, b / c, d), which is the choice ``torch.nn.functional.max_pool2d`` makes, so the results are
identical to torch's. One pass each way, parallel over the (N*C) planes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .format import check_array


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
                a, b, c, d = r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]
                # the first largest in row-major order (a, b / c, d)
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


__all__ = ["maxpool2x2", "maxpool2x2_backward"]
