"""Slow, readable references that define the kernels' results.

* ``*_oracle`` functions are numpy int64 implementations of the same integer algorithm as the
  kernels, element by element and channel by channel, with every sum written as a plain
  ``np.sum``. They call the spec's per-channel scalar functions (``qkernels.fixedpoint`` and the
  per-channel L1BN spec, ``qkernels.l1bn_spec``), so the per-channel arithmetic is defined once;
  the per-element arithmetic here is independent of the kernels'. Kernels must equal these bit
  for bit. For 16-bit codes (int16 x or dy) the centred per-element affine is evaluated on
  Python integers (object arrays), without the kernels' clamp window; the backward's
  ``P = m*sum(g*x) - S*sum(g)`` (up to 2**77) is always a Python integer.
* ``*_float64`` functions evaluate the paper's equations (10, 11, 20) in float64 and round the
  result to the output format; kernels must be within one LSB of them.
"""

from __future__ import annotations

import numpy as np

from .fixedpoint import MANT_BITS, MOMENTUM_BITS, RUN_EXP, dy_norm, dy_recip, qmax
from .format import code_dtype
from .l1bn_spec import (
    GS_MAX,
    GS_MIN,
    GS_SUM,
    GS_SUMX,
    N_GSTATS,
    N_STATS,
    ST_MAX,
    ST_MIN,
    ST_REXP,
    ST_RMANT,
    ST_SIGNSUM,
    ST_SUM,
    backward_params,
    dev_reciprocal,
    dgamma_code,
    forward_params,
    grad_exponent,
    inference_params,
    mean_thresholds,
    output_exponent,
)

_STAT_COLUMNS = {"sum": ST_SUM, "sign_sum": ST_SIGNSUM, "rmant": ST_RMANT, "rexp": ST_REXP,
                 "min": ST_MIN, "max": ST_MAX}
from .rng import random_u64_np, stream_key_np


def _channels(a: np.ndarray) -> np.ndarray:
    """(N, C[, H, W]) -> (C, m) int64: one row of values per channel."""
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).astype(np.int64)


def _unchannels(rows: np.ndarray, shape: tuple) -> np.ndarray:
    moved = (shape[1], shape[0]) + tuple(shape[2:])
    return np.moveaxis(rows.reshape(moved), 0, 1)


def _affine(x: np.ndarray, a: int, b: int, sh: int, q: int) -> np.ndarray:
    return np.clip((int(a) * x + int(b)) >> int(sh), -q, q)


def _affine_centred(x: np.ndarray, a: int, b: int, c: int, sh: int, q: int) -> np.ndarray:
    """saturate((a*(x - c) + b) >> sh) on Python integers (no overflow, no clamp window)."""
    v = (int(a) * (x.astype(object) - int(c)) + int(b)) >> int(sh)
    return np.clip(v, -q, q).astype(np.int64)


def _dy_norm_int(v: int) -> tuple[int, int]:
    """Dyadic (mant, exp) of any Python integer, truncated toward zero (like dy_norm)."""
    if v == 0:
        return 0, 0
    b = abs(v).bit_length()
    mant = abs(v) >> (b - MANT_BITS) if b > MANT_BITS else abs(v) << (MANT_BITS - b)
    return (mant if v > 0 else -mant), b - MANT_BITS


def _stats_array(stats: dict) -> np.ndarray:
    """The oracle's statistics in the kernels' column layout (for the exponent functions)."""
    out = np.zeros((len(stats["sum"]), N_STATS), dtype=np.int64)
    for key, col in _STAT_COLUMNS.items():
        out[:, col] = stats[key]
    return out


def l1bn_forward_oracle(xq, x_exp, gamma_q, gamma_exp, beta_q, beta_exp, out_bits, out_exp,
                        eps_log2=None):
    """Integer L1BN training forward; returns (y codes as int64, out_exp, per-channel stats).

    ``out_exp=None`` chooses the exponent from the range, with the spec's
    :func:`~qkernels.l1bn_spec.output_exponent` applied to the statistics computed here.
    """
    rows = _channels(xq)
    m = rows.shape[1]
    q = int(qmax(out_bits))
    inv_m = dy_recip(*dy_norm(m, 0))
    use_eps = eps_log2 is not None
    eps_shift = (eps_log2 - x_exp) if use_eps else 0
    out = np.empty_like(rows)
    stats = {k: np.empty(rows.shape[0], dtype=np.int64)
             for k in ("sum", "dev", "sign_sum", "t_lo", "t_hi", "rmant", "rexp", "min", "max")}
    for c, x in enumerate(rows):
        s = int(np.sum(x))
        sign = np.sign(m * x - s)                       # sgn(x - mu), exactly
        dev = int(np.sum(np.abs(m * x - s)))            # D = m**2 * sigma
        rm, re = dev_reciprocal(dev, m, eps_shift, use_eps)
        t_lo, t_hi = mean_thresholds(s, m, *inv_m)
        for k, v in zip(stats, (s, dev, int(np.sum(sign)), t_lo, t_hi, rm, re, x.min(),
                                x.max())):
            stats[k][c] = v
    if out_exp is None:
        out_exp = int(output_exponent(_stats_array(stats), m, gamma_q, gamma_exp, beta_q,
                                      beta_exp, out_bits))
    wide = xq.dtype != np.int8
    for c, x in enumerate(rows):
        a, b, cen, sh = forward_params(
            int(stats["sum"][c]), m, int(stats["t_hi"][c]) - 1, int(stats["rmant"][c]),
            int(stats["rexp"][c]), int(gamma_q[c]), gamma_exp - out_exp, int(beta_q[c]),
            beta_exp - out_exp, int(stats["min"][c]), int(stats["max"][c]), wide)
        # 16-bit codes: the centred affine, on Python integers
        out[c] = _affine_centred(x, a, b, cen, sh, q) if wide else _affine(x, a, b, sh, q)
    return _unchannels(out, xq.shape), out_exp, stats


def l1bn_backward_oracle(xq, gq, stats, gamma_q, gamma_exp, x_exp, g_exp, dx_bits, dx_exp,
                         dgamma_exp):
    """Integer equation (20); returns (dx codes, dx_exp, dgamma codes, dbeta) as int64.

    ``dx_exp=None`` chooses the exponent with the spec's :func:`~qkernels.l1bn_spec.grad_exponent`.
    P is a Python integer; with 16-bit x or dy the centred affines run on Python integers.
    """
    rows, grows = _channels(xq), _channels(gq)
    m = rows.shape[1]
    n_channels = rows.shape[0]
    q = int(qmax(dx_bits))
    k_base = gamma_exp + g_exp - x_exp
    wide = xq.dtype != np.int8 or gq.dtype != np.int8
    inv_m = dy_recip(*dy_norm(m, 0))
    sums = [(int(np.sum(g)), int(np.sum(g * x)), int(g.min()), int(g.max()))
            for x, g in zip(rows, grows)]
    if dx_exp is None:
        gstats = np.zeros((n_channels, N_GSTATS), dtype=np.int64)
        for c, (sg, sgx, lo, hi) in enumerate(sums):
            gstats[c, [GS_SUM, GS_SUMX, GS_MIN, GS_MAX]] = sg, sgx, lo, hi
        dx_exp = int(grad_exponent(_stats_array(stats), gstats, m, gamma_q, k_base, dx_bits))
    dx = np.empty_like(rows)
    dgamma = np.empty(n_channels, dtype=np.int64)
    dbeta = np.empty(n_channels, dtype=np.int64)
    for c, (x, g) in enumerate(zip(rows, grows)):
        s, rm, re, ss = (int(stats[k][c]) for k in ("sum", "rmant", "rexp", "sign_sum"))
        t = int(stats["t_hi"][c]) - 1
        sg, sgx, lo, hi = sums[c]
        a, b, cen, sh = backward_params(s, m, t, ss, rm, re, sg, sgx, lo, hi, int(gamma_q[c]),
                                        k_base - dx_exp, *inv_m, wide)
        sign = np.sign(m * x - s)
        j = np.where(sign > 0, 2, np.where(sign < 0, 0, 1))
        if wide:
            v = (int(a) * (g.astype(object) - np.array([int(c_) for c_ in cen], dtype=object)[j])
                 + np.array([int(b_) for b_ in b], dtype=object)[j]) >> int(sh)
        else:
            v = (int(a) * g + b[j]) >> int(sh)
        dx[c] = np.clip(v, -q, q).astype(np.int64)
        dbeta[c] = sg
        p = m * sgx - s * sg  # Python integers: exact
        dgamma[c] = dgamma_code(m, *_dy_norm_int(p), rm, re, g_exp - dgamma_exp)
    return _unchannels(dx, xq.shape), dx_exp, dgamma, dbeta


def l1bn_inference_oracle(xq, x_exp, gamma_q, gamma_exp, beta_q, beta_exp, run_mean, run_dev,
                          out_bits, out_exp, eps_log2=None, x_bits=None):
    """Folded inference, element by element (``x_bits`` as in ``l1bn_fold``: by default 8 for
    int8 codes and 16 for int16 codes)."""
    use_eps = eps_log2 is not None
    q = int(qmax(out_bits))
    x_bits = (8 if xq.dtype == np.int8 else 16) if x_bits is None else x_bits
    params = inference_params(gamma_q, gamma_exp - out_exp, beta_q, beta_exp - out_exp, run_mean,
                              run_dev, x_exp, (eps_log2 - x_exp) if use_eps else 0, use_eps,
                              x_bits > 8)
    rows = _channels(xq)
    if xq.dtype == np.int8:
        out = np.stack([_affine(x, *params[c], q) for c, x in enumerate(rows)])
    else:  # on Python integers
        out = np.stack([_affine_centred(x, a, b, 0, sh, q) for x, (a, b, sh) in zip(rows, params)])
    return _unchannels(out, xq.shape)


def running_update_oracle(run_mean, run_dev, stats, m, x_exp, momentum_q):
    """Running statistics after one update, from exact rationals rounded the kernels' way.

    Returns new (run_mean, run_dev); the batch statistics are rounded to RUN_EXP codes exactly
    (Python integers), so the kernel may differ by the dyadic reciprocal's last bit.
    """
    new_mean, new_dev = run_mean.copy(), run_dev.copy()
    lim = 1 << 44
    for c in range(run_mean.shape[0]):
        for buf, num, den in ((new_mean, int(stats["sum"][c]), m),
                              (new_dev, int(stats["dev"][c]), m * m)):
            shift = x_exp - RUN_EXP
            num, den = (num << shift, den) if shift >= 0 else (num, den << -shift)
            batch = (2 * num + den) // (2 * den)               # round half up
            old = max(-lim, min(lim, int(buf[c])))
            delta = max(-lim, min(lim, batch)) - old
            step = (momentum_q * delta + (1 << (MOMENTUM_BITS - 1))) >> MOMENTUM_BITS
            buf[c] = max(-lim, min(lim, old + step))
    return new_mean, new_dev


# ---------------------------------------------------------------------------------------------
# float64 evaluations of the paper's equations, rounded to the output format.


def _round_sat(v: np.ndarray, q: int) -> np.ndarray:
    return np.clip(np.floor(v + 0.5), -q, q).astype(np.int64)


def l1bn_forward_float64(xq, x_exp, gamma_q, gamma_exp, beta_q, beta_exp, out_bits, out_exp,
                         eps_log2=None, rounded=True):
    """Equations (9)-(11) in float64, in units of the output LSB (rounded unless told not)."""
    x = np.ldexp(_channels(xq).astype(np.float64), x_exp)
    mu = x.mean(axis=1, keepdims=True)
    sigma = np.abs(x - mu).mean(axis=1, keepdims=True)
    eps = 0.0 if eps_log2 is None else 2.0 ** eps_log2
    den = sigma + eps
    xhat = np.divide(x - mu, den, out=np.zeros_like(x), where=den > 0)
    gamma = np.ldexp(gamma_q.astype(np.float64), gamma_exp)[:, None]
    beta = np.ldexp(beta_q.astype(np.float64), beta_exp)[:, None]
    y = np.ldexp(gamma * xhat + beta, -out_exp)
    y = _round_sat(y, int(qmax(out_bits))) if rounded else y
    return _unchannels(y, xq.shape)


def l1bn_backward_float64(xq, x_exp, gq, g_exp, gamma_q, gamma_exp, dx_bits, dx_exp,
                          eps_log2=None, rounded=True):
    """Equation (20) in float64: returns (dx in output LSBs, dgamma, dbeta) in real units."""
    x = np.ldexp(_channels(xq).astype(np.float64), x_exp)
    dy = np.ldexp(_channels(gq).astype(np.float64), g_exp)
    dx, dgamma, dbeta = l1bn_backward_equation20(x, dy, np.ldexp(
        gamma_q.astype(np.float64), gamma_exp), 0.0 if eps_log2 is None else 2.0 ** eps_log2)
    dx = np.ldexp(dx, -dx_exp)
    dx = _round_sat(dx, int(qmax(dx_bits))) if rounded else dx
    return _unchannels(dx, xq.shape), dgamma, dbeta


def l1bn_backward_equation20(x, dy, gamma, eps):
    """Equation (20) on float rows (C, m): returns (dx, dgamma, dbeta).

    A channel with sigma + eps = 0 is constant: its xhat is 0 and it passes back no error.
    """
    mu = x.mean(axis=1, keepdims=True)
    den = np.abs(x - mu).mean(axis=1, keepdims=True) + eps
    safe = np.where(den > 0, den, 1.0)
    xhat = np.where(den > 0, (x - mu) / safe, 0.0)
    g = dy * gamma[:, None]
    sgn = np.sign(xhat)
    dx = (g - g.mean(axis=1, keepdims=True)
          - (g * xhat).mean(axis=1, keepdims=True) * (sgn - sgn.mean(axis=1, keepdims=True)))
    dx = np.where(den > 0, dx / safe, 0.0)
    return dx, (dy * xhat).sum(axis=1), dy.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Rounding of wide codes (qkernels.rng), on exact Python integers: the spec's formulas as
# written, with no overflow to avoid.


def _saturate_codes(y: np.ndarray, bits: int) -> np.ndarray:
    q = int(qmax(bits))
    return np.minimum(np.maximum(y, -q), q).astype(code_dtype(bits))


def round_shift_nearest_oracle(w, shift, bits):
    """``saturate((w + 2**(shift-1)) >> shift)`` (``saturate(w)`` for shift 0), round half up."""
    half = (1 << (shift - 1)) if shift else 0
    return _saturate_codes((w.astype(object) + half) >> shift, bits)


def stochastic_round_shift_oracle(w, shift, bits, *, seed, step, tensor_id):
    """``saturate((w + (r & (2**shift - 1))) >> shift)`` with ``r`` the numpy random stream
    (:func:`qkernels.rng.random_u64_np`) at each element's flat C-order index."""
    key = stream_key_np(seed, step, tensor_id)
    r = random_u64_np(key, np.arange(w.size)).reshape(w.shape)
    add = (r & np.uint64((1 << shift) - 1)).astype(object)
    return _saturate_codes((w.astype(object) + add) >> shift, bits)
