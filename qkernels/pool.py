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
    for p in prange(x.shape[0]):
        for i in range(gy.shape[1]):
            r0 = x[p, 2 * i]
            r1 = x[p, 2 * i + 1]
            g0 = gx[p, 2 * i]
            g1 = gx[p, 2 * i + 1]
            for j in range(gy.shape[2]):
                # first strict maximum in row-major order (a, b, c, d)
                k = 0
                m = r0[2 * j]
                if r0[2 * j + 1] > m:
                    k, m = 1, r0[2 * j + 1]
                if r1[2 * j] > m:
                    k, m = 2, r1[2 * j]
                if r1[2 * j + 1] > m:
                    k = 3
                g = gy[p, i, j]
                g0[2 * j] = g if k == 0 else np.float32(0)
                g0[2 * j + 1] = g if k == 1 else np.float32(0)
                g1[2 * j] = g if k == 2 else np.float32(0)
                g1[2 * j + 1] = g if k == 3 else np.float32(0)


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
    _backward(xp, np.ascontiguousarray(gy).reshape(xp.shape[0], *gy.shape[-2:]), gx)
    return gx.reshape(x.shape)


__all__ = ["maxpool2x2", "maxpool2x2_backward"]
