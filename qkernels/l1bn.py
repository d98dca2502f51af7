r"""Integer L1-norm batch normalization (L1BN) kernels for int8 and int16 codes.

Per channel, over its ``m = N*H*W`` codes ``x`` (see ``docs/l1bn-integer.md`` for the
derivation and the error bounds):

.. math::

    S = \sum x_i, \qquad D = \sum |m x_i - S| = m \sum s_i x_i - S \sum s_i,
    \qquad s_i = \operatorname{sgn}(m x_i - S),

so :math:`\mu = S/m` and :math:`\sigma = D/m^2` exactly, in input LSBs, and

.. math::

    \hat x_i = \frac{x_i - \mu}{\sigma + \epsilon} = \frac{m\,(m x_i - S)}{D_\epsilon},
    \qquad y_i = \gamma \hat x_i + \beta .

The statistics use only add, sub and sign; ``1/D_eps`` is the one division per channel
(:func:`~qkernels.fixedpoint.dy_recip`); every output code is one integer multiply-and-shift
``saturate((A*x + B) >> sh)``. The backward is equation (20) of the paper with the integer sums
``sum g``, ``sum g*x`` and ``sum s`` and the forward's reciprocal reused. No floating point
is used anywhere in this module's kernels (``tests/qkernels/test_no_float.py`` reads their LLVM
IR to prove it).

One set of kernels serves both code widths: the per-element passes are written once and Numba
specialises them on the code dtype (the partial-sum types and block lengths below); the
per-channel math is :mod:`qkernels.l1bn_spec`, where the one width-dependent choice is the
affine form (plain for int8 data, centred ``saturate((A*(x - c) + B) >> sh)`` once x or dy is
int16, ``docs/l1bn-integer.md`` section 3). Drivers run the same per-channel worker serially or
with ``prange`` over channels (large tensors: over groups of channels, each pass in memory
order), so each channel's sums stay on one thread and results do not depend on the thread
count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import _i32
from ._jit import PARALLEL_MIN, serial_and_parallel
from .fixedpoint import (
    M_MAX,
    MOMENTUM_BITS,
    OFFSET_MAX,
    centred_lanes,
    dy_norm,
    dy_recip,
    fits_int32,
    qmax,
    saturate,
)
from .format import QTensor, check_array, check_bits, check_exp, check_qtensor, code_dtype
from .l1bn_spec import (
    GS_MAX,
    GS_MIN,
    GS_SUM,
    GS_SUMX,
    N_GSTATS,
    N_STATS,
    ST_DEV,
    ST_MAX,
    ST_MIN,
    ST_REXP,
    ST_RMANT,
    ST_SIGNSUM,
    ST_SUM,
    ST_THI,
    ST_TLO,
    backward_params_p,
    dev_reciprocal,
    dgamma_code,
    forward_params,
    grad_exponent,
    grad_p_dyadic,
    inference_params,
    mean_thresholds,
    output_exponent,
    running_update,
)

# ---------------------------------------------------------------------------------------------
# Operation counter slots (Table IV's columns). Workers tally into ``cnt`` when it is non-empty;
# the public functions pass an empty array, so counting costs one branch per row.
SIGN, ABS, ADD, SUB, MUL, DIV, SQUARE, SQRT = range(8)
OP_NAMES = ("SIGN", "ABS", "ADD", "SUB", "MUL", "DIV", "SQUARE", "SQRT")

_NO_COUNT = np.zeros(0, dtype=np.int64)


@njit(cache=True, inline="always")
def _tally(cnt, op, n):
    if cnt.shape[0]:
        cnt[op] += n


# ---------------------------------------------------------------------------------------------
# Types of the per-element sums, by code dtype (section 10). Sums go into partials twice as wide
# as the codes over blocks short enough that they cannot overflow, then into int64; the explicit
# casts on every step stop Numba from widening the lanes to int64 (64 int8 codes per AVX-512
# vector instead of 8). Each helper is a plain function (what runs under NUMBA_DISABLE_JIT) with
# a Numba overload that resolves the dtype at compile time.
#
#   codes          partial of sum(x), sum(s*x)   block       partial of sum(g*x)       block
#   int8           int16 (|.| <= 128*128)        128         int32 of int16 products   2**16
#   int16 / mixed  int32 (|.| <= 2**15*2**15)    2**15       int64 of int32 products   2**15


def _code_bound(x):
    """Largest |code| of ``x``'s dtype (int8 codes may be -128); also the block of codes whose
    sum fits a partial twice as wide (``bound**2`` is 2**14, 2**30)."""
    return 128 if x.dtype == np.int8 else 1 << 15


def _part(x, v):
    """``v`` as the partial-sum type of sums of codes like ``x``'s."""
    return np.int16(v) if x.dtype == np.int8 else np.int32(v)


def _narrow_gx(x, g):
    return x.dtype == np.int8 and g.dtype == np.int8


def _gx_part(x, g, v):
    """``v`` as the partial-sum type of sum(g*x)."""
    return np.int32(v) if _narrow_gx(x, g) else np.int64(v)


def _gx(x, g, gv, xv):
    """The exact product g*x: int16 for int8 codes, int64 (of an int32 product) otherwise."""
    return np.int16(gv * xv) if _narrow_gx(x, g) else np.int64(np.int32(gv) * np.int32(xv))


def _gx_block(x, g):
    return 1 << 16 if _narrow_gx(x, g) else 1 << 15


def _int8(*arrays):
    return all(t.dtype == types.int8 for t in arrays)


@overload(_code_bound, inline="always")
def _code_bound_jit(x):
    n = 128 if _int8(x) else 1 << 15
    return lambda x: n


@overload(_part, inline="always")
def _part_jit(x, v):
    return (lambda x, v: np.int16(v)) if _int8(x) else (lambda x, v: np.int32(v))


@overload(_gx_part, inline="always")
def _gx_part_jit(x, g, v):
    return (lambda x, g, v: np.int32(v)) if _int8(x, g) else (lambda x, g, v: np.int64(v))


@overload(_gx, inline="always")
def _gx_jit(x, g, gv, xv):
    if _int8(x, g):
        return lambda x, g, gv, xv: np.int16(gv * xv)
    return lambda x, g, gv, xv: np.int64(np.int32(gv) * np.int32(xv))


@overload(_gx_block, inline="always")
def _gx_block_jit(x, g):
    n = 1 << 16 if _int8(x, g) else 1 << 15
    return lambda x, g: n


# ---------------------------------------------------------------------------------------------
# Per-element passes over one channel of x with shape (N, C, L). Each loops over the channel's
# N rows as 1-D views indexed from 0 (the form LLVM vectorizes). They are separate functions,
# not inlined into the workers: inlined together, LLVM vectorizes the second pass of a worker
# about half as well (measured: backward 0.30 vs 0.15 ns per element).


@njit(cache=True)
def _sum_pass(x, c, want_range, cnt):
    """S = sum of the channel's codes (add only), and when ``want_range`` the smallest and
    largest code (else 0, 0). The flag is loop-invariant: LLVM compiles the loop once for each
    value, so the plain sum is not slowed by the range."""
    total = np.int64(0)
    lo = x[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], _code_bound(row)):
            block = row[start:start + _code_bound(row)]
            part = _part(row, 0)
            for i in range(block.shape[0]):
                v = block[i]
                part = _part(row, part + v)
                if want_range:
                    lo = v if v < lo else lo
                    hi = v if v > hi else hi
            total += part
        _tally(cnt, ADD, row.shape[0])
    if not want_range:
        return total, np.int64(0), np.int64(0)
    return total, np.int64(lo), np.int64(hi)


@njit(cache=True)
def _sign_pass(x, c, t_lo, t_hi, cnt):
    """sum(s*x) and sum(s) for s = sgn(x - mu) = [x >= t_hi] - [x <= t_lo] (the thresholds lie
    one beyond the code range at most, so they fit the partial type)."""
    lo = _part(x, t_lo)
    hi = _part(x, t_hi)
    sx = np.int64(0)
    ss = np.int64(0)
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], _code_bound(row)):
            block = row[start:start + _code_bound(row)]
            part_sx = _part(row, 0)
            part_s = _part(row, 0)
            for i in range(block.shape[0]):
                v = _part(row, block[i])
                s = _part(row, _part(row, v >= hi) - _part(row, v <= lo))
                part_sx = _part(row, part_sx + _part(row, s * v))
                part_s = _part(row, part_s + s)
            sx += part_sx
            ss += part_s
        _tally(cnt, SIGN, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sx, ss


@njit(cache=True)
def _grad_sums_pass(x, g, c, want_range, cnt):
    """sum(g) (int32 partials: |g| <= 2**15), sum(g*x), and when ``want_range`` the smallest
    and largest g (else 0, 0)."""
    sg = np.int64(0)
    sgx = np.int64(0)
    lo = g[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        for start in range(0, row.shape[0], _gx_block(row, grow)):
            block = row[start:start + _gx_block(row, grow)]
            gblock = grow[start:start + _gx_block(row, grow)]
            part_g = np.int32(0)
            part_gx = _gx_part(row, grow, 0)
            for i in range(block.shape[0]):
                gv = gblock[i]
                part_g = np.int32(part_g + gv)
                part_gx = _gx_part(row, grow, part_gx + _gx(row, grow, gv, block[i]))
                if want_range:
                    lo = gv if gv < lo else lo
                    hi = gv if gv > hi else hi
            sg += part_g
            sgx += part_gx
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    if not want_range:
        return sg, sgx, np.int64(0), np.int64(0)
    return sg, sgx, np.int64(lo), np.int64(hi)


@njit(cache=True)
def _affine_pass(x, y, c, a, b, sh, q, cnt):
    """y = saturate((a*x + b) >> sh): one multiply-and-shift per element (int32 lanes when
    nothing can overflow them, else int64)."""
    narrow = fits_int32(a, abs(b), sh, _code_bound(x))
    a32, b32, sh32, q32 = np.int32(a), np.int32(b), np.int32(sh), np.int32(q)
    for n in range(x.shape[0]):
        row = x[n, c]
        out = y[n, c]
        if narrow:
            for i in range(row.shape[0]):
                out[i] = _i32.clamp(_i32.mul_add_shr(a32, np.int32(row[i]), b32, sh32), q32)
        else:
            for i in range(row.shape[0]):
                out[i] = saturate((a * np.int64(row[i]) + b) >> sh, q)
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, row.shape[0])


@njit(cache=True)
def _affine_pass_c(x, y, c, a, b, cen, sh, q, lanes32, window, cnt):
    """y = saturate((a*(x - cen) + b) >> sh): int32 lanes, or int64 with x - cen clamped to
    [-window, window] (which changes no result, see centred_lanes)."""
    a32, b32, c32, sh32, q32 = np.int32(a), np.int32(b), np.int32(cen), np.int32(sh), np.int32(q)
    for n in range(x.shape[0]):
        row = x[n, c]
        out = y[n, c]
        if lanes32:
            for i in range(row.shape[0]):
                out[i] = _i32.clamp(_i32.mul_sub_add_shr(a32, np.int32(row[i]), c32, b32, sh32),
                                    q32)
        else:
            for i in range(row.shape[0]):
                d = min(max(np.int64(row[i]) - cen, -window), window)
                out[i] = saturate((a * d + b) >> sh, q)
        _tally(cnt, SUB, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, row.shape[0])


@njit(cache=True)
def _grad_affine_pass(x, g, dx, c, a, b, sh, t_lo, t_hi, q, cnt):
    """dx = saturate((a*g + b[s+1]) >> sh) with s = sgn(x - mu) selecting the offset (the plain
    form: int8 x and g)."""
    narrow = fits_int32(a, max(abs(b[0]), abs(b[1]), abs(b[2])), sh, _code_bound(g))
    a32, sh32, q32 = np.int32(a), np.int32(sh), np.int32(q)
    b_neg, b_zero, b_pos = np.int32(b[0]), np.int32(b[1]), np.int32(b[2])
    lo, hi = np.int32(t_lo), np.int32(t_hi)
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        out = dx[n, c]
        if narrow:
            for i in range(row.shape[0]):
                off = _i32.pick3(np.int32(row[i]), lo, hi, b_neg, b_zero, b_pos)
                out[i] = _i32.clamp(_i32.mul_add_shr(a32, np.int32(grow[i]), off, sh32), q32)
        else:
            for i in range(row.shape[0]):
                v = row[i]
                off = b[2] if v >= t_hi else (b[0] if v <= t_lo else b[1])
                out[i] = saturate((a * np.int64(grow[i]) + off) >> sh, q)
        _tally(cnt, SIGN, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, row.shape[0])


@njit(cache=True)
def _grad_affine_pass_c(x, g, dx, c, a, b, cen, sh, t_lo, t_hi, q, lanes32, window, cnt):
    """dx = saturate((a*(g - cen[s+1]) + b[s+1]) >> sh), s = sgn(x - mu) picking the centre
    and offset of its affine (the centred form)."""
    a32, sh32, q32 = np.int32(a), np.int32(sh), np.int32(q)
    b_neg, b_zero, b_pos = np.int32(b[0]), np.int32(b[1]), np.int32(b[2])
    c_neg, c_zero, c_pos = np.int32(cen[0]), np.int32(cen[1]), np.int32(cen[2])
    lo, hi = np.int32(t_lo), np.int32(t_hi)
    # int64 lanes: scalars, not array loads, inside the loop (the stores to dx could alias them)
    b0, b1, b2 = b[0], b[1], b[2]
    c0, c1, c2 = cen[0], cen[1], cen[2]
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        out = dx[n, c]
        if lanes32:
            for i in range(row.shape[0]):
                v = np.int32(row[i])
                off = _i32.pick3(v, lo, hi, b_neg, b_zero, b_pos)
                ctr = _i32.pick3(v, lo, hi, c_neg, c_zero, c_pos)
                out[i] = _i32.clamp(_i32.mul_sub_add_shr(a32, np.int32(grow[i]), ctr, off, sh32),
                                    q32)
        else:
            for i in range(row.shape[0]):
                v = row[i]
                off = b2 if v >= t_hi else (b0 if v <= t_lo else b1)
                ctr = c2 if v >= t_hi else (c0 if v <= t_lo else c1)
                d = min(max(np.int64(grow[i]) - ctr, -window), window)
                out[i] = saturate((a * d + off) >> sh, q)
        _tally(cnt, SIGN, row.shape[0])
        _tally(cnt, SUB, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, row.shape[0])


@njit(cache=True)
def _centred_lanes_of(a, b, cen, sh, q, lo, hi):
    """int32 lanes and clamp window for one channel's centred affines over codes [lo, hi] (``b``
    and ``cen``: tuples, one entry per affine)."""
    b_max = np.int64(0)
    d_max = np.int64(0)
    for j in range(len(b)):
        b_max = max(b_max, abs(b[j]))
        d_max = max(d_max, abs(lo - cen[j]), abs(hi - cen[j]))
    return centred_lanes(a, b_max, d_max, sh, q)


# ---------------------------------------------------------------------------------------------
# Per-channel workers and their serial / parallel drivers. ``wide`` is True when x (forward) or
# x or dy (backward) holds int16 codes: the centred affine, which needs each channel's range.


@njit(cache=True)
def _inv_m(m, wide, cnt):
    """1/m as a dyadic (mant, exp) array: one division per call, shared by all channels."""
    out = np.zeros(2, dtype=np.int64)
    if wide:
        out[0], out[1] = dy_recip(*dy_norm(np.int64(m), 0))
        _tally(cnt, DIV, 1)
    return out


@njit(cache=True, inline="always")
def _stats_channel(x, c, inv_m, eps_shift, use_eps, want_range, stats, cnt):
    """Forward statistics of one channel: S, D, sum of signs, thresholds, 1/D_eps, and (when
    ``want_range``) the smallest and largest code."""
    m = np.int64(x.shape[0] * x.shape[2])
    st = stats[c]
    st[ST_SUM], st[ST_MIN], st[ST_MAX] = _sum_pass(x, c, want_range, cnt)
    _sign_channel(x, c, m, inv_m, stats, cnt)
    _finish_channel(c, m, eps_shift, use_eps, stats, cnt)


@njit(cache=True, inline="always")
def _sign_channel(x, c, m, inv_m, stats, cnt):
    """The mean's thresholds from S (of all ``m`` codes), and this data's sum(s*x), sum(s)
    (kept in the D and sign-sum slots until :func:`_finish_channel`)."""
    st = stats[c]
    t_lo, t_hi = mean_thresholds(st[ST_SUM], m, inv_m[0], inv_m[1])
    st[ST_DEV], st[ST_SIGNSUM] = _sign_pass(x, c, t_lo, t_hi, cnt)
    st[ST_TLO] = t_lo
    st[ST_THI] = t_hi


@njit(cache=True, inline="always")
def _finish_channel(c, m, eps_shift, use_eps, stats, cnt):
    """D = m*sum(s*x) - S*sum(s) and 1/D_eps from the channel's sums over all ``m`` codes."""
    st = stats[c]
    dev = m * st[ST_DEV] - st[ST_SUM] * st[ST_SIGNSUM]
    st[ST_DEV] = dev
    st[ST_RMANT], st[ST_REXP] = dev_reciprocal(dev, m, eps_shift, use_eps)
    # thresholds (2 MUL), D (2 MUL, 1 SUB), epsilon (1 MUL, 1 ADD), reciprocal (1 DIV)
    _tally(cnt, MUL, 4 + use_eps)
    _tally(cnt, ADD, use_eps)
    _tally(cnt, SUB, 1)
    _tally(cnt, DIV, 1)


@njit(cache=True)
def _channel_forward_params(c, m, gamma_q, gamma_shift, beta_q, beta_shift, wide, stats):
    """(A, B, c, sh) of one channel's forward affine, from its statistics (over ``m`` codes)."""
    st = stats[c]
    return forward_params(st[ST_SUM], m, st[ST_THI] - 1, st[ST_RMANT], st[ST_REXP],
                          np.int64(gamma_q[c]), gamma_shift, np.int64(beta_q[c]), beta_shift,
                          st[ST_MIN], st[ST_MAX], wide)


@njit(cache=True)
def _forward_affine(c, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats, cnt):
    """(A, B, c, sh, int32 lanes, window) of one channel's forward affine (the lanes and window
    of the centred form; True, 0 for the plain one)."""
    a, b, cen, sh = _channel_forward_params(c, m, gamma_q, gamma_shift, beta_q, beta_shift, wide,
                                            stats)
    lanes32, window = True, np.int64(0)
    if wide:
        st = stats[c]
        lanes32, window = _centred_lanes_of(a, (b,), (cen,), sh, q, st[ST_MIN], st[ST_MAX])
    _tally(cnt, MUL, 3)  # slope (2), affine (1)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 1)
    return a, b, cen, sh, lanes32, window


@njit(cache=True, inline="always")
def _apply_channel(x, y, c, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats, cnt):
    """y = gamma*xhat + beta for one channel, from its statistics (over ``m`` codes)."""
    a, b, cen, sh, lanes32, window = _forward_affine(c, m, gamma_q, gamma_shift, beta_q,
                                                     beta_shift, q, wide, stats, cnt)
    if wide:
        _affine_pass_c(x, y, c, a, b, cen, sh, q, lanes32, window, cnt)
    else:
        _affine_pass(x, y, c, a, b, sh, q, cnt)


# Drivers. With the output exponent given, one region does each channel's statistics and apply
# (the channel's data is still in cache); to choose it from the range, statistics of all
# channels come first, then the exponent, then the apply.


def _forward(x, y, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift, use_eps, q, wide,
             stats, cnt):
    m = np.int64(x.shape[0] * x.shape[2])
    inv_m = _inv_m(m, True, cnt)
    for c in prange(x.shape[1]):
        _stats_channel(x, c, inv_m, eps_shift, use_eps, wide, stats, cnt)
        _apply_channel(x, y, c, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats,
                       cnt)


_forward_serial, _forward_parallel = serial_and_parallel(_forward)


def _stats(x, eps_shift, use_eps, stats, cnt):
    inv_m = _inv_m(np.int64(x.shape[0] * x.shape[2]), True, cnt)
    for c in prange(x.shape[1]):
        _stats_channel(x, c, inv_m, eps_shift, use_eps, True, stats, cnt)


_stats_serial, _stats_parallel = serial_and_parallel(_stats)


# The statistics in three phases, for data split across processes (``l1bn_forward``'s
# ``collective``): each phase's sums are this process's; the caller adds them up between phases.


def _sum_phase(x, stats, cnt):
    for c in prange(x.shape[1]):
        st = stats[c]
        st[ST_SUM], st[ST_MIN], st[ST_MAX] = _sum_pass(x, c, True, cnt)


_sum_phase_serial, _sum_phase_parallel = serial_and_parallel(_sum_phase)


def _sign_phase(x, m, stats, cnt):
    inv_m = _inv_m(m, True, cnt)
    for c in prange(x.shape[1]):
        _sign_channel(x, c, m, inv_m, stats, cnt)


_sign_phase_serial, _sign_phase_parallel = serial_and_parallel(_sign_phase)


@njit(cache=True)
def _finish_phase(m, eps_shift, use_eps, stats, cnt):
    for c in range(stats.shape[0]):
        _finish_channel(c, m, eps_shift, use_eps, stats, cnt)


def _apply(x, y, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats, cnt):
    for c in prange(x.shape[1]):
        _apply_channel(x, y, c, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats,
                       cnt)


_apply_serial, _apply_parallel = serial_and_parallel(_apply)


@njit(cache=True, inline="always")
def _grad_stats_channel(x, g, c, want_range, gstats, cnt):
    sg, sgx, lo, hi = _grad_sums_pass(x, g, c, want_range, cnt)
    gs = gstats[c]
    gs[GS_SUM] = sg
    gs[GS_SUMX] = sgx
    gs[GS_MIN] = lo
    gs[GS_MAX] = hi


@njit(cache=True)
def _channel_backward_params(c, m, stats, gstats, inv_m, gamma_q, k_shift, dgamma_shift, dgamma,
                             dbeta, wide):
    """(A, [B], [c], sh) of one channel's dx affines; writes its dgamma and dbeta."""
    st = stats[c]
    gs = gstats[c]
    t = st[ST_THI] - 1
    dbeta[c] = gs[GS_SUM]
    pm, pe = grad_p_dyadic(st[ST_SUM], m, t, gs[GS_SUM], gs[GS_SUMX])
    dgamma[c] = dgamma_code(m, pm, pe, st[ST_RMANT], st[ST_REXP], dgamma_shift)
    return backward_params_p(pm, pe, m, st[ST_SIGNSUM], st[ST_RMANT], st[ST_REXP], gs[GS_SUM],
                             gs[GS_MIN], gs[GS_MAX], np.int64(gamma_q[c]), k_shift, inv_m[0],
                             inv_m[1], wide)


@njit(cache=True)
def _backward_affine(c, m, stats, gstats, inv_m, gamma_q, k_shift, q, dgamma_shift, dgamma,
                     dbeta, wide, cnt):
    """(A, B, centres, sh, int32 lanes, window) of one channel's dx affines (B and the centres:
    one per sign); writes its dgamma and dbeta."""
    a, b, cen, sh = _channel_backward_params(c, m, stats, gstats, inv_m, gamma_q, k_shift,
                                             dgamma_shift, dgamma, dbeta, wide)
    lanes32, window = True, np.int64(0)
    if wide:
        gs = gstats[c]
        lanes32, window = _centred_lanes_of(a, b, cen, sh, q, gs[GS_MIN], gs[GS_MAX])
    # per channel: P (2 MUL, 1 SUB), slopes (4 MUL), three offsets (3 MUL, 3 SUB), affine
    # (2 MUL, 2 ADD, 1 SUB), dgamma (2 MUL); centred: P in two limbs (+1 MUL, +1 SUB) and the
    # three roots (+6 MUL, +3 SUB)
    _tally(cnt, MUL, 20 if wide else 13)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 9 if wide else 5)
    return a, b, cen, sh, lanes32, window


@njit(cache=True, inline="always")
def _grad_apply_channel(x, g, dx, c, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                        dgamma_shift, dgamma, dbeta, wide, cnt):
    a, b, cen, sh, lanes32, window = _backward_affine(c, m, stats, gstats, inv_m, gamma_q,
                                                      k_shift, q, dgamma_shift, dgamma, dbeta,
                                                      wide, cnt)
    st = stats[c]
    if wide:
        _grad_affine_pass_c(x, g, dx, c, a, b, cen, sh, st[ST_TLO], st[ST_THI], q, lanes32,
                            window, cnt)
    else:
        _grad_affine_pass(x, g, dx, c, a, b, sh, st[ST_TLO], st[ST_THI], q, cnt)


def _backward(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma, dbeta, wide,
              cnt):
    m = np.int64(x.shape[0] * x.shape[2])
    inv_m = _inv_m(m, wide, cnt)
    for c in prange(x.shape[1]):
        _grad_stats_channel(x, g, c, wide, gstats, cnt)
        _grad_apply_channel(x, g, dx, c, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                            dgamma_shift, dgamma, dbeta, wide, cnt)


_backward_serial, _backward_parallel = serial_and_parallel(_backward)


def _grad_stats(x, g, gstats, cnt):
    for c in prange(x.shape[1]):
        _grad_stats_channel(x, g, c, True, gstats, cnt)


_grad_stats_serial, _grad_stats_parallel = serial_and_parallel(_grad_stats)


def _grad_apply(x, g, dx, m, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma, dbeta,
                wide, cnt):
    inv_m = _inv_m(m, wide, cnt)
    for c in prange(x.shape[1]):
        _grad_apply_channel(x, g, dx, c, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                            dgamma_shift, dgamma, dbeta, wide, cnt)


_grad_apply_serial, _grad_apply_parallel = serial_and_parallel(_grad_apply)


def _affine(x, y, params, q, cnt):
    for c in prange(x.shape[1]):
        _affine_pass(x, y, c, params[c, 0], params[c, 1], params[c, 2], q, cnt)


_affine_serial, _affine_parallel = serial_and_parallel(_affine)


# ---------------------------------------------------------------------------------------------
# Channel groups, for large (N, C, L) tensors: the same passes, each over a group of channels
# one row of the batch at a time, so it reads memory in order (a group's rows of one sample are
# adjacent) instead of jumping by C*L codes after every L. Channel by channel, short rows at a
# large stride keep the hardware prefetcher from ramping up; (256, 128, 16, 16) int8 codes read
# at half the speed. A group holds about GROUP_BYTES of codes, so its later passes find them in
# the L2 cache. Every sum is still one channel's, exact: the results are the channel drivers'.

#: Codes of one group (x, or x and dy in the backward), in bytes: fits a core's L2 cache.
GROUP_BYTES = 1 << 20
#: (N, C, L) codes of at least this many bytes (x, and dy in the backward, each) take the
#: group drivers; smaller ones stay in cache channel by channel.
GROUPS_MIN = 4 << 20


@njit(cache=True, inline="always")
def _block(blk, size, n):
    """Bounds of block ``blk`` of ``size`` items out of ``n``."""
    return blk * size, min(blk * size + size, n)


@njit(cache=True, inline="always")
def _stats_group(x, c0, c1, inv_m, eps_shift, use_eps, want_range, stats, cnt):
    """:func:`_stats_channel` of channels c0..c1, pass by pass over the group's rows."""
    m = np.int64(x.shape[0] * x.shape[2])
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        for c in range(c0, c1):
            s, lo, hi = _sum_pass(xn, c, want_range, cnt)
            if n == 0:
                stats[c, ST_SUM], stats[c, ST_MIN], stats[c, ST_MAX] = s, lo, hi
            else:
                stats[c, ST_SUM] += s
                stats[c, ST_MIN] = min(stats[c, ST_MIN], lo)
                stats[c, ST_MAX] = max(stats[c, ST_MAX], hi)
    for c in range(c0, c1):
        stats[c, ST_TLO], stats[c, ST_THI] = mean_thresholds(stats[c, ST_SUM], m, inv_m[0],
                                                             inv_m[1])
        stats[c, ST_DEV] = 0
        stats[c, ST_SIGNSUM] = 0
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        for c in range(c0, c1):
            sx, ss = _sign_pass(xn, c, stats[c, ST_TLO], stats[c, ST_THI], cnt)
            stats[c, ST_DEV] += sx
            stats[c, ST_SIGNSUM] += ss
    for c in range(c0, c1):
        _finish_channel(c, m, eps_shift, use_eps, stats, cnt)


@njit(cache=True, inline="always")
def _apply_group(x, y, c0, c1, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats,
                 cnt):
    """:func:`_apply_channel` of channels c0..c1, row by row."""
    p = np.empty((c1 - c0, 6), np.int64)  # A, B, centre, sh, int32 lanes, window
    for c in range(c0, c1):
        a, b, cen, sh, lanes32, window = _forward_affine(c, m, gamma_q, gamma_shift, beta_q,
                                                         beta_shift, q, wide, stats, cnt)
        k = c - c0
        p[k, 0], p[k, 1], p[k, 2], p[k, 3], p[k, 4], p[k, 5] = a, b, cen, sh, lanes32, window
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        yn = y[n:n + 1]
        for c in range(c0, c1):
            k = c - c0
            if wide:
                _affine_pass_c(xn, yn, c, p[k, 0], p[k, 1], p[k, 2], p[k, 3], q, p[k, 4] != 0,
                               p[k, 5], cnt)
            else:
                _affine_pass(xn, yn, c, p[k, 0], p[k, 1], p[k, 3], q, cnt)


def _forward_groups(x, y, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift, use_eps, q, wide,
                    stats, cnt, bounds):
    m = np.int64(x.shape[0] * x.shape[2])
    inv_m = _inv_m(m, True, cnt)
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _stats_group(x, c0, c1, inv_m, eps_shift, use_eps, wide, stats, cnt)
        _apply_group(x, y, c0, c1, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide,
                     stats, cnt)


_forward_groups_parallel = njit(cache=True, parallel=True)(_forward_groups)


def _stats_groups(x, eps_shift, use_eps, stats, cnt, bounds):
    inv_m = _inv_m(np.int64(x.shape[0] * x.shape[2]), True, cnt)
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _stats_group(x, c0, c1, inv_m, eps_shift, use_eps, True, stats, cnt)


_stats_groups_parallel = njit(cache=True, parallel=True)(_stats_groups)


def _apply_groups(x, y, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats, cnt, bounds):
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _apply_group(x, y, c0, c1, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide,
                     stats, cnt)


_apply_groups_parallel = njit(cache=True, parallel=True)(_apply_groups)


@njit(cache=True, inline="always")
def _grad_stats_group(x, g, c0, c1, want_range, gstats, cnt):
    """:func:`_grad_stats_channel` of channels c0..c1, row by row."""
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        gn = g[n:n + 1]
        for c in range(c0, c1):
            sg, sgx, lo, hi = _grad_sums_pass(xn, gn, c, want_range, cnt)
            if n == 0:
                gstats[c, GS_SUM], gstats[c, GS_SUMX] = sg, sgx
                gstats[c, GS_MIN], gstats[c, GS_MAX] = lo, hi
            else:
                gstats[c, GS_SUM] += sg
                gstats[c, GS_SUMX] += sgx
                gstats[c, GS_MIN] = min(gstats[c, GS_MIN], lo)
                gstats[c, GS_MAX] = max(gstats[c, GS_MAX], hi)


@njit(cache=True, inline="always")
def _grad_apply_group(x, g, dx, c0, c1, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                      dgamma_shift, dgamma, dbeta, wide, cnt):
    """:func:`_grad_apply_channel` of channels c0..c1, row by row."""
    p = np.empty((c1 - c0, 10), np.int64)  # A, B (3), centres (3), sh, int32 lanes, window
    for c in range(c0, c1):
        a, b, cen, sh, lanes32, window = _backward_affine(c, m, stats, gstats, inv_m, gamma_q,
                                                          k_shift, q, dgamma_shift, dgamma,
                                                          dbeta, wide, cnt)
        k = c - c0
        p[k, 0], p[k, 1], p[k, 2], p[k, 3] = a, b[0], b[1], b[2]
        p[k, 4], p[k, 5], p[k, 6] = cen[0], cen[1], cen[2]
        p[k, 7], p[k, 8], p[k, 9] = sh, lanes32, window
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        gn = g[n:n + 1]
        dxn = dx[n:n + 1]
        for c in range(c0, c1):
            k = c - c0
            b = (p[k, 1], p[k, 2], p[k, 3])
            t_lo, t_hi = stats[c, ST_TLO], stats[c, ST_THI]
            if wide:
                _grad_affine_pass_c(xn, gn, dxn, c, p[k, 0], b, (p[k, 4], p[k, 5], p[k, 6]),
                                    p[k, 7], t_lo, t_hi, q, p[k, 8] != 0, p[k, 9], cnt)
            else:
                _grad_affine_pass(xn, gn, dxn, c, p[k, 0], b, p[k, 7], t_lo, t_hi, q, cnt)


def _backward_groups(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma, dbeta,
                     wide, cnt, bounds):
    m = np.int64(x.shape[0] * x.shape[2])
    inv_m = _inv_m(m, wide, cnt)
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _grad_stats_group(x, g, c0, c1, wide, gstats, cnt)
        _grad_apply_group(x, g, dx, c0, c1, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                          dgamma_shift, dgamma, dbeta, wide, cnt)


_backward_groups_parallel = njit(cache=True, parallel=True)(_backward_groups)


def _grad_stats_groups(x, g, gstats, cnt, bounds):
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _grad_stats_group(x, g, c0, c1, True, gstats, cnt)


_grad_stats_groups_parallel = njit(cache=True, parallel=True)(_grad_stats_groups)


def _grad_apply_groups(x, g, dx, m, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                       dbeta, wide, cnt, bounds):
    inv_m = _inv_m(m, wide, cnt)
    for grp in prange(bounds.shape[0] - 1):
        c0, c1 = bounds[grp], bounds[grp + 1]
        _grad_apply_group(x, g, dx, c0, c1, m, stats, gstats, inv_m, gamma_q, k_shift, q,
                          dgamma_shift, dgamma, dbeta, wide, cnt)


_grad_apply_groups_parallel = njit(cache=True, parallel=True)(_grad_apply_groups)


# ---------------------------------------------------------------------------------------------
# 2-D int8 codes (N, C), a linear layer's norm, as they are: the same sums, statistics and
# affines with the channels along each row, so every pass runs over rows of channels (vectorized
# across channels) and nothing is transposed. Channels go to the threads in blocks of
# ROW_BLOCK; a block's statistics and outputs depend on its own channels only. The drivers take
# the (N, C, L) drivers' arguments (``m`` and ``wide`` unused: int8 codes, m = N), so the public
# functions call either set alike.

#: Channels per block of the 2-D kernels (a block of a 128-row batch is 8 KiB: in L1).
ROW_BLOCK = 64
#: Rows whose int8 products g*x (|.| <= 2**14) an int32 partial per channel holds.
ROW_SPAN = 1 << 16


@njit(cache=True, inline="always")
def _rows_stats_block(x, c0, c1, inv_m, eps_shift, use_eps, want_range, stats, cnt):
    """Forward statistics of channels c0..c1 of x (N, C): :func:`_stats_channel`'s."""
    width = c1 - c0
    m = np.int64(x.shape[0])
    s = np.zeros(width, np.int32)  # |S| <= 128 * M_MAX = 2**30
    lo = x[0, c0:c1].astype(np.int32)
    hi = lo.copy()
    for r in range(x.shape[0]):
        row = x[r, c0:c1]
        for k in range(width):
            v = np.int32(row[k])
            s[k] += v
            if want_range:
                lo[k] = min(lo[k], v)
                hi[k] = max(hi[k], v)
    t_lo = np.empty(width, np.int32)
    t_hi = np.empty(width, np.int32)
    for k in range(width):
        st = stats[c0 + k]
        st[ST_SUM] = s[k]
        st[ST_MIN] = lo[k] if want_range else 0
        st[ST_MAX] = hi[k] if want_range else 0
        t_lo[k], t_hi[k] = mean_thresholds(st[ST_SUM], m, inv_m[0], inv_m[1])
        st[ST_TLO] = t_lo[k]
        st[ST_THI] = t_hi[k]
    sx = np.zeros(width, np.int32)  # |sum(s*x)| <= 2**30 as S
    ss = np.zeros(width, np.int32)
    for r in range(x.shape[0]):
        row = x[r, c0:c1]
        for k in range(width):
            v = np.int32(row[k])
            sign = np.int32(v >= t_hi[k]) - np.int32(v <= t_lo[k])
            sx[k] += sign * v
            ss[k] += sign
    for k in range(width):
        st = stats[c0 + k]
        st[ST_DEV] = sx[k]
        st[ST_SIGNSUM] = ss[k]
        _finish_channel(c0 + k, m, eps_shift, use_eps, stats, cnt)


@njit(cache=True, inline="always")
def _rows_apply_block(x, y, c0, c1, gamma_q, gamma_shift, beta_q, beta_shift, q, stats):
    """y = saturate((A*x + B) >> sh) for channels c0..c1 (int32 lanes when every channel of the
    block fits them, as :func:`_affine_pass` decides per channel; else int64)."""
    width = c1 - c0
    m = np.int64(x.shape[0])
    a = np.empty(width, np.int64)
    b = np.empty(width, np.int64)
    sh = np.empty(width, np.int64)
    narrow = True
    for k in range(width):
        a[k], b[k], _, sh[k] = _channel_forward_params(c0 + k, m, gamma_q, gamma_shift, beta_q,
                                                       beta_shift, False, stats)
        narrow = narrow and fits_int32(a[k], abs(b[k]), sh[k], 128)
    if narrow:
        a32, b32, sh32 = a.astype(np.int32), b.astype(np.int32), sh.astype(np.int32)
        q32 = np.int32(q)
        for r in range(x.shape[0]):
            row = x[r, c0:c1]
            out = y[r, c0:c1]
            for k in range(width):
                out[k] = _i32.clamp(_i32.mul_add_shr(a32[k], np.int32(row[k]), b32[k], sh32[k]),
                                    q32)
    else:
        for r in range(x.shape[0]):
            row = x[r, c0:c1]
            out = y[r, c0:c1]
            for k in range(width):
                out[k] = saturate((a[k] * np.int64(row[k]) + b[k]) >> sh[k], q)


def _rows_forward(x, y, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift, use_eps, q, wide,
                  stats, cnt):
    inv_m = _inv_m(np.int64(x.shape[0]), True, cnt)
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_stats_block(x, c0, c1, inv_m, eps_shift, use_eps, False, stats, cnt)
        _rows_apply_block(x, y, c0, c1, gamma_q, gamma_shift, beta_q, beta_shift, q, stats)


_rows_forward_serial, _rows_forward_parallel = serial_and_parallel(_rows_forward)


def _rows_stats(x, eps_shift, use_eps, stats, cnt):
    inv_m = _inv_m(np.int64(x.shape[0]), True, cnt)
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_stats_block(x, c0, c1, inv_m, eps_shift, use_eps, True, stats, cnt)


_rows_stats_serial, _rows_stats_parallel = serial_and_parallel(_rows_stats)


def _rows_apply(x, y, m, gamma_q, gamma_shift, beta_q, beta_shift, q, wide, stats, cnt):
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_apply_block(x, y, c0, c1, gamma_q, gamma_shift, beta_q, beta_shift, q, stats)


_rows_apply_serial, _rows_apply_parallel = serial_and_parallel(_rows_apply)


@njit(cache=True, inline="always")
def _rows_grad_stats_block(x, g, c0, c1, want_range, gstats):
    """sum(g), sum(g*x), and when ``want_range`` the smallest and largest g (else 0, 0) of
    channels c0..c1 (int8 x and g). The flag is loop-invariant: LLVM compiles the loop once
    for each value."""
    width = c1 - c0
    sg = np.zeros(width, np.int64)
    sgx = np.zeros(width, np.int64)
    part_g = np.zeros(width, np.int32)
    part_gx = np.zeros(width, np.int32)
    lo = g[0, c0:c1].astype(np.int32)
    hi = lo.copy()
    for start in range(0, g.shape[0], ROW_SPAN):
        part_g[:] = 0
        part_gx[:] = 0
        for r in range(start, min(start + ROW_SPAN, g.shape[0])):
            row = x[r, c0:c1]
            grow = g[r, c0:c1]
            for k in range(width):
                gv = np.int32(grow[k])
                part_g[k] += gv
                part_gx[k] += gv * np.int32(row[k])
                if want_range:
                    lo[k] = min(lo[k], gv)
                    hi[k] = max(hi[k], gv)
        for k in range(width):
            sg[k] += part_g[k]
            sgx[k] += part_gx[k]
    for k in range(width):
        gs = gstats[c0 + k]
        gs[GS_SUM] = sg[k]
        gs[GS_SUMX] = sgx[k]
        gs[GS_MIN] = lo[k] if want_range else 0
        gs[GS_MAX] = hi[k] if want_range else 0


@njit(cache=True, inline="always")
def _rows_grad_apply_block(x, g, dx, c0, c1, stats, gstats, inv_m, gamma_q, k_shift, q,
                           dgamma_shift, dgamma, dbeta):
    """dx of channels c0..c1 (:func:`_grad_affine_pass`'s affines), dgamma and dbeta."""
    width = c1 - c0
    m = np.int64(x.shape[0])
    a = np.empty(width, np.int64)
    sh = np.empty(width, np.int64)
    b = np.empty((3, width), np.int64)
    narrow = True
    for k in range(width):
        a[k], bk, _, sh[k] = _channel_backward_params(c0 + k, m, stats, gstats, inv_m, gamma_q,
                                                      k_shift, dgamma_shift, dgamma, dbeta,
                                                      False)
        b[0, k], b[1, k], b[2, k] = bk[0], bk[1], bk[2]
        narrow = narrow and fits_int32(a[k], max(abs(bk[0]), abs(bk[1]), abs(bk[2])), sh[k],
                                       128)
    t_lo = stats[c0:c1, ST_TLO].astype(np.int32)
    t_hi = stats[c0:c1, ST_THI].astype(np.int32)
    if narrow:
        a32, sh32, b32 = a.astype(np.int32), sh.astype(np.int32), b.astype(np.int32)
        b_neg, b_zero, b_pos = b32[0], b32[1], b32[2]
        q32 = np.int32(q)
        for r in range(x.shape[0]):
            row = x[r, c0:c1]
            grow = g[r, c0:c1]
            out = dx[r, c0:c1]
            for k in range(width):
                off = _i32.pick3(np.int32(row[k]), t_lo[k], t_hi[k], b_neg[k], b_zero[k],
                                 b_pos[k])
                out[k] = _i32.clamp(_i32.mul_add_shr(a32[k], np.int32(grow[k]), off, sh32[k]),
                                    q32)
    else:
        for r in range(x.shape[0]):
            row = x[r, c0:c1]
            grow = g[r, c0:c1]
            out = dx[r, c0:c1]
            for k in range(width):
                v = row[k]
                off = b[2, k] if v >= t_hi[k] else (b[0, k] if v <= t_lo[k] else b[1, k])
                out[k] = saturate((a[k] * np.int64(grow[k]) + off) >> sh[k], q)


def _rows_backward(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma, dbeta,
                   wide, cnt):
    inv_m = _inv_m(np.int64(x.shape[0]), False, cnt)
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_grad_stats_block(x, g, c0, c1, False, gstats)
        _rows_grad_apply_block(x, g, dx, c0, c1, stats, gstats, inv_m, gamma_q, k_shift, q,
                               dgamma_shift, dgamma, dbeta)


_rows_backward_serial, _rows_backward_parallel = serial_and_parallel(_rows_backward)


def _rows_grad_stats(x, g, gstats, cnt):
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_grad_stats_block(x, g, c0, c1, True, gstats)


_rows_grad_stats_serial, _rows_grad_stats_parallel = serial_and_parallel(_rows_grad_stats)


def _rows_grad_apply(x, g, dx, m, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                     dbeta, wide, cnt):
    inv_m = _inv_m(np.int64(x.shape[0]), False, cnt)
    for blk in prange(-(-x.shape[1] // ROW_BLOCK)):
        c0, c1 = _block(blk, ROW_BLOCK, x.shape[1])
        _rows_grad_apply_block(x, g, dx, c0, c1, stats, gstats, inv_m, gamma_q, k_shift, q,
                               dgamma_shift, dgamma, dbeta)


_rows_grad_apply_serial, _rows_grad_apply_parallel = serial_and_parallel(_rows_grad_apply)


# ---------------------------------------------------------------------------------------------
# Public API: validate, reshape to (N, C, L), call a driver, reshape back.


class L1BNCache(NamedTuple):
    """What a training forward leaves for its backward and for the running statistics."""

    x: np.ndarray  # the input codes as (N, C, L), or as (N, C) for the 2-D int8 kernels
    shape: tuple  # the caller's input shape
    x_exp: int
    gamma: QTensor
    eps_log2: int | None
    stats: np.ndarray  # int64 (C, N_STATS): sum, D, sum of signs, thresholds, 1/D, min, max
    m: int = 0  # values per channel the statistics cover (all processes'); 0: x's own
    collective: object = None  # the forward's collective, which the backward uses too

    @property
    def count(self) -> int:
        """Values per channel the statistics cover."""
        return self.m or self.x.size // self.x.shape[1]


def _as_ncl(a: np.ndarray) -> np.ndarray:
    """(N, C) -> (1, C, N) contiguous copy; (N, C, H, W) -> (N, C, H*W) view."""
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)[None]
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def _from_ncl(a: np.ndarray, shape: tuple, out: np.ndarray | None) -> np.ndarray:
    """Back to the caller's layout; into ``out`` when given (4-D ``a`` is already its view)."""
    if len(shape) == 2:
        if out is None:
            return np.ascontiguousarray(a[0].T)
        out[...] = a[0].T
    return a.reshape(shape) if out is None else out


def _output(out: np.ndarray | None, name: str, shape: tuple, bits: int) -> np.ndarray:
    """``out`` once checked (C-contiguous, ``shape``, the dtype of ``bits``-wide codes), or a
    new array."""
    dtype = code_dtype(bits)
    if out is None:
        return np.empty(shape, dtype=dtype)
    check_array(out, name, (dtype,), (len(shape),))
    if out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array of shape {shape}, got "
                         f"{out.shape}")
    return out


def _output_ncl(out: np.ndarray | None, name: str, shape: tuple, bits: int) -> np.ndarray:
    """An (N, C, L) array to write codes into: a view of ``out`` (4-D) or a new array."""
    if len(shape) == 2:
        if out is not None:
            _output(out, name, shape, bits)
        return np.empty((1, shape[1], shape[0]), dtype=code_dtype(bits))
    return _output(out, name, shape, bits).reshape(shape[0], shape[1], -1)


def _rows_layout(q: np.ndarray) -> bool:
    """Codes the 2-D int8 kernels take as they are."""
    return q.ndim == 2 and q.dtype == np.int8


@functools.lru_cache(maxsize=64)
def _group_bounds(n_ch: int, parts: int, size: int) -> np.ndarray:
    """Bounds of the channel groups: ``parts`` near-equal shares of the channels (one per
    thread: ``prange`` hands each thread an equal run of groups), each split into the same
    number of near-equal groups of at most ``size`` channels."""
    parts = min(parts, n_ch)
    largest = -(-n_ch // parts)  # channels of the largest share
    per_part = -(-largest // size)  # groups per share
    bounds = []
    for p in range(parts):
        lo, hi = p * n_ch // parts, (p + 1) * n_ch // parts
        bounds += [lo + j * (hi - lo) // per_part for j in range(per_part)]
    bounds.append(n_ch)
    out = np.array(bounds, dtype=np.int64)
    out.flags.writeable = False
    return out


def _in_groups(streams: int, *drivers):
    """The group drivers, each called with its last argument filled in: the bounds of the
    channel groups, each of whose codes in the first ``streams`` arrays (x, or x and dy) hold
    about GROUP_BYTES, in one share per Numba thread."""
    def bind(driver):
        def call(*args):
            x = args[0]
            per_channel = x.shape[0] * x.shape[2] * sum(a.itemsize for a in args[:streams])
            bounds = _group_bounds(x.shape[1], numba.get_num_threads(),
                                   max(1, GROUP_BYTES // per_channel))
            return driver(*args, bounds)
        return call
    return tuple(bind(d) for d in drivers)


#: (statistics, apply, both in one region) drivers by (layout, parallel): "rows" for 2-D int8
#: codes as they are, "groups" for large (N, C, L) codes on the threads, "channels" for the
#: rest (and for large codes on one thread).
_FORWARD_KERNELS = {
    ("channels", False): (_stats_serial, _apply_serial, _forward_serial),
    ("channels", True): (_stats_parallel, _apply_parallel, _forward_parallel),
    ("groups", True): _in_groups(1, _stats_groups_parallel, _apply_groups_parallel,
                                 _forward_groups_parallel),
    ("rows", False): (_rows_stats_serial, _rows_apply_serial, _rows_forward_serial),
    ("rows", True): (_rows_stats_parallel, _rows_apply_parallel, _rows_forward_parallel),
}
_BACKWARD_KERNELS = {
    ("channels", False): (_grad_stats_serial, _grad_apply_serial, _backward_serial),
    ("channels", True): (_grad_stats_parallel, _grad_apply_parallel, _backward_parallel),
    ("groups", True): _in_groups(2, _grad_stats_groups_parallel, _grad_apply_groups_parallel,
                                 _backward_groups_parallel),
    ("rows", False): (_rows_grad_stats_serial, _rows_grad_apply_serial, _rows_backward_serial),
    ("rows", True): (_rows_grad_stats_parallel, _rows_grad_apply_parallel,
                     _rows_backward_parallel),
}


def _ncl_layout(parallel: bool, *arrays: np.ndarray) -> str:
    """The drivers of (N, C, L) codes: "groups" when they run on the threads and each array
    holds GROUPS_MIN bytes on average, else "channels"."""
    large = sum(a.nbytes for a in arrays) >= GROUPS_MIN * len(arrays)
    return "groups" if parallel and large else "channels"


def _check_input(x: np.ndarray, name: str, share: bool = False) -> tuple[int, int]:
    """(C, m) of training input ``x``; ``share``: x is one process's share of a batch (its
    own m may be 1; the batch's is checked once known)."""
    check_array(x, name, (np.int8, np.int16), (2, 4))
    n_channels = x.shape[1]
    m = x.size // max(n_channels, 1)
    if n_channels == 0 or m == 0:
        raise ValueError(f"{name} has an empty dimension: shape {x.shape}")
    if m == 1 and not share:
        raise ValueError(f"Expected more than 1 value per channel when training, got {name} "
                         f"of shape {x.shape} (N*H*W = 1)")
    if m > M_MAX:
        raise ValueError(f"{name} has N*H*W = {m} values per channel; the {x.dtype} L1BN "
                         f"kernels support at most {M_MAX} (qkernels.fixedpoint.M_MAX)")
    return n_channels, m


def _check_affine(gamma: QTensor, beta: QTensor, n_channels: int) -> None:
    for t, name in ((gamma, "gamma"), (beta, "beta")):
        check_qtensor(t, name)
        check_array(t.q, f"{name}.q", (np.int32,), (1,))
        if t.q.shape[0] != n_channels:
            raise ValueError(f"{name}.q has {t.q.shape[0]} entries, expected one per channel "
                             f"({n_channels})")


def _check_offset(beta: QTensor, out_exp: int) -> None:
    beta_max = max(-int(beta.q.min()), int(beta.q.max()))
    if beta_max and beta_max.bit_length() + beta.exp - out_exp > OFFSET_MAX.bit_length() - 1:
        raise ValueError(f"beta is too large for the output format: |beta| must stay below "
                         f"2**{OFFSET_MAX.bit_length() - 1} output LSBs (raise out_exp)")


def _eps_shift(eps_log2: int | None, x_exp: int) -> tuple[int, bool]:
    if eps_log2 is None:
        return 0, False
    return check_exp(eps_log2, "eps_log2") - x_exp, True


class Collective(Protocol):
    """What a synchronized L1BN needs of the processes that share a batch: an in-place
    all-reduce of an int64 array (``op`` is ``"sum"`` or ``"max"``), the same call in every
    process. ``qtrain.distributed`` implements it on torch.distributed; any other transport
    (MPI, shared memory) can."""

    def allreduce(self, a: np.ndarray, op: str) -> None: ...


def _allreduce(collective: Collective, table: np.ndarray, sums: tuple[int, ...], lo: int,
               hi: int, extra: int = 0) -> int:
    """Add up the columns ``sums`` of a per-channel table across processes, and take the
    smallest of column ``lo`` and the largest of ``hi`` (one sum and one max call); ``extra``
    (a count) is added up with the sums, and its total returned."""
    total = np.empty((table.shape[0] * len(sums) + 1,), dtype=np.int64)
    total[:-1] = table[:, list(sums)].reshape(-1)
    total[-1] = extra
    collective.allreduce(total, "sum")
    table[:, list(sums)] = total[:-1].reshape(table.shape[0], len(sums))
    peak = np.concatenate([-table[:, lo], table[:, hi]])
    collective.allreduce(peak, "max")
    table[:, lo], table[:, hi] = -peak[:table.shape[0]], peak[table.shape[0]:]
    return int(total[-1])


def _synchronized_stats(x3, eps_shift, use_eps, stats, collective: Collective,
                        parallel: bool) -> int:
    """The forward statistics of a batch split across processes (three all-reduces: S and m,
    the range, then sum(s*x) and sum(s) once the thresholds of the whole batch's mean are
    known); returns the batch's values per channel."""
    sum_fn, sign_fn = ((_sum_phase_parallel, _sign_phase_parallel) if parallel
                       else (_sum_phase_serial, _sign_phase_serial))
    sum_fn(x3, stats, _NO_COUNT)
    m = _allreduce(collective, stats, (ST_SUM,), ST_MIN, ST_MAX, x3.shape[0] * x3.shape[2])
    if m == 1:
        raise ValueError("Expected more than 1 value per channel when training, got a batch "
                         "of N*H*W = 1 across the processes")
    if m > M_MAX:
        raise ValueError(f"the batch has N*H*W = {m} values per channel; the {x3.dtype} L1BN "
                         f"kernels support at most {M_MAX} (qkernels.fixedpoint.M_MAX)")
    sign_fn(x3, np.int64(m), stats, _NO_COUNT)
    signs = np.ascontiguousarray(stats[:, [ST_DEV, ST_SIGNSUM]])
    collective.allreduce(signs, "sum")
    stats[:, [ST_DEV, ST_SIGNSUM]] = signs
    _finish_phase(np.int64(m), eps_shift, use_eps, stats, _NO_COUNT)
    return m


def l1bn_forward(x: QTensor, gamma: QTensor, beta: QTensor, *, out_bits: int,
                 out_exp: int | None = None, eps_log2: int | None = None,
                 out: np.ndarray | None = None, parallel: bool = True,
                 collective: Collective | None = None) -> tuple[QTensor, L1BNCache]:
    r"""Training-mode L1BN forward on int8 or int16 codes.

    .. math:: y = \gamma \frac{x - \mu_B}{\sigma_B + \epsilon} + \beta, \qquad
              \sigma_B = \frac{1}{m}\sum |x_i - \mu_B|

    Args:
        x: input codes, shape (N, C) or (N, C, H, W), with exponent: int8 (up to 8 bits) or
            int16 (9..16 bits; the centred affine, ``docs/l1bn-integer.md`` section 3).
        gamma, beta: per-channel int32 codes with their exponents.
        out_bits: width of the output codes (2..16; int8 storage up to 8, int16 above).
        out_exp: exponent of the output codes; None chooses it from the output's range
            (:func:`output_exponent`), as the requantizers do.
        eps_log2: epsilon = 2**eps_log2 in the input's real units; None for epsilon = 0, where a
            constant channel (sigma = 0) outputs beta and passes back no error.
        out: optional C-contiguous array (x's shape, int8 or int16 per out_bits) to write the
            codes into, so a training loop can reuse its buffers.
        parallel: run channels on all Numba threads (results are identical either way; 2-D
            int8 input, on its own kernels, takes one thread below 2**16 codes anyway).
        collective: the batch is split across processes (a synchronized batch norm): each
            holds its share of the batch, with the same ``x.exp``, ``gamma``, ``beta``,
            ``eps_log2`` and ``out_exp``; the statistics are the whole batch's, added up between
            the kernels' phases by ``collective.allreduce`` (:class:`Collective`; three calls),
            so every process gets the outputs of its share exactly as one process holding the
            whole batch would. The backward then synchronizes too (two calls).

    Returns:
        ``(y, cache)``: the output codes (same shape as x) and what :func:`l1bn_backward` and
        :func:`l1bn_update_running` need.

    Every output code is within one LSB of the float64 evaluation of the same equations,
    rounded half up and saturated (``docs/l1bn-integer.md`` states the conditions).
    """
    check_qtensor(x, "x")
    n_channels, m = _check_input(x.q, "x.q", collective is not None)
    out_bits = check_bits(out_bits, "out_bits")
    _check_affine(gamma, beta, n_channels)
    eps_shift, use_eps = _eps_shift(eps_log2, x.exp)

    stats = np.empty((n_channels, N_STATS), dtype=np.int64)
    q = (1 << (out_bits - 1)) - 1
    rows = _rows_layout(x.q) and collective is None  # x3, y3: (N, C) there, else (N, C, L)
    if rows:
        x3 = np.ascontiguousarray(x.q)
        y3 = _output(out, "out", x3.shape, out_bits)
        parallel = parallel and x.q.size >= PARALLEL_MIN
    else:
        x3 = _as_ncl(x.q)
        y3 = _output_ncl(out, "out", x.q.shape, out_bits)
    wide = x3.dtype != np.int8
    layout = ("rows" if rows else "channels" if collective is not None
              else _ncl_layout(parallel, x3))
    stats_fn, apply_fn, forward_fn = _FORWARD_KERNELS[layout, parallel]
    if collective is not None:
        m = _synchronized_stats(x3, eps_shift, use_eps, stats, collective, parallel)
    if out_exp is None or collective is not None:
        if collective is None:
            stats_fn(x3, eps_shift, use_eps, stats, _NO_COUNT)
        if out_exp is None:
            out_exp = output_exponent(stats, m, gamma.q, gamma.exp, beta.q, beta.exp, out_bits)
        out_exp = check_exp(int(out_exp), "out_exp")
        _check_offset(beta, out_exp)
        apply_fn(x3, y3, np.int64(m), gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp,
                 q, wide, stats, _NO_COUNT)
    else:
        out_exp = check_exp(out_exp, "out_exp")
        _check_offset(beta, out_exp)
        forward_fn(x3, y3, gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp, eps_shift,
                   use_eps, q, wide, stats, _NO_COUNT)
    cache = L1BNCache(x3, x.q.shape, x.exp, gamma, eps_log2, stats,
                      m if collective is not None else 0, collective)
    return QTensor(y3 if rows else _from_ncl(y3, x.q.shape, out), out_exp), cache


def l1bn_backward(dy: QTensor, cache: L1BNCache, *, dx_bits: int, dx_exp: int | None = None,
                  dgamma_exp: int | None = None, out: np.ndarray | None = None,
                  parallel: bool = True) -> tuple[QTensor, QTensor, QTensor]:
    r"""L1BN backward, equation (20), reusing the forward's reciprocal.

    .. math:: \frac{\partial \ell}{\partial x_i} = \frac{1}{\sigma_B + \epsilon}\Big\{
              g_i - \mu(g) - \mu(g \hat x)\,[\operatorname{sgn}(\hat x_i)
              - \mu(\operatorname{sgn}(\hat x))]\Big\}, \qquad g_i = \gamma\,
              \frac{\partial \ell}{\partial y_i}

    Args:
        dy: error codes with the forward output's shape, and their exponent: int8 (up to 8
            bits) or int16 (9..16 bits). Its width is independent of x's; unless both are
            int8, dx takes the centred affine (``docs/l1bn-integer.md`` section 3).
        cache: the forward's cache.
        dx_bits, dx_exp: width and exponent of the returned error codes; ``dx_exp=None``
            chooses the exponent from a bound of dx's range (:func:`grad_exponent`).
        dgamma_exp: exponent of the returned dgamma codes (default ``dy.exp - 16``).
        out: optional C-contiguous array for the dx codes (like ``out`` of the forward).

    Returns:
        ``(dx, dgamma, dbeta)``: dx codes like x; dgamma = sum(dy * xhat) as int64 codes rounded
        to ``dgamma_exp``; dbeta = sum(dy), exact, with ``dy``'s exponent.
    """
    if not isinstance(cache, L1BNCache):
        raise TypeError(f"cache must be the L1BNCache returned by l1bn_forward, got "
                        f"{type(cache).__name__}")
    check_qtensor(dy, "dy")
    check_array(dy.q, "dy.q", (np.int8, np.int16), (2, 4))
    if dy.q.shape != cache.shape:
        raise ValueError(f"dy.q has shape {dy.q.shape}, expected the forward's {cache.shape}")
    dx_bits = check_bits(dx_bits, "dx_bits")
    dgamma_exp = dy.exp - 16 if dgamma_exp is None else check_exp(dgamma_exp, "dgamma_exp")

    n_channels = dy.q.shape[1]
    m = cache.count
    gstats = np.empty((n_channels, N_GSTATS), dtype=np.int64)
    k_base = cache.gamma.exp + dy.exp - cache.x_exp
    dgamma = np.empty(n_channels, dtype=np.int64)
    dbeta = np.empty(n_channels, dtype=np.int64)
    q = (1 << (dx_bits - 1)) - 1
    x3 = cache.x
    rows = x3.ndim == 2 and _rows_layout(dy.q)  # the 2-D kernels' forward, int8 errors
    if rows:
        g3 = np.ascontiguousarray(dy.q)
        dx3 = _output(out, "out", cache.shape, dx_bits)
        parallel = parallel and dy.q.size >= PARALLEL_MIN
    else:
        x3 = _as_ncl(x3) if x3.ndim == 2 else x3
        g3 = _as_ncl(dy.q)
        dx3 = _output_ncl(out, "out", cache.shape, dx_bits)
    wide = x3.dtype != np.int8 or g3.dtype != np.int8
    layout = ("rows" if rows else "channels" if cache.collective is not None
              else _ncl_layout(parallel, x3, g3))
    stats_fn, apply_fn, backward_fn = _BACKWARD_KERNELS[layout, parallel]
    if dx_exp is None or cache.collective is not None:
        stats_fn(x3, g3, gstats, _NO_COUNT)
        if cache.collective is not None:  # the whole batch's sums, smallest and largest g
            _allreduce(cache.collective, gstats, (GS_SUM, GS_SUMX), GS_MIN, GS_MAX)
        if dx_exp is None:
            dx_exp = grad_exponent(cache.stats, gstats, m, cache.gamma.q, k_base, dx_bits)
        dx_exp = check_exp(int(dx_exp), "dx_exp")
        apply_fn(x3, g3, dx3, np.int64(m), cache.stats, gstats, cache.gamma.q,
                 k_base - dx_exp, q, dy.exp - dgamma_exp, dgamma, dbeta, wide, _NO_COUNT)
    else:
        dx_exp = check_exp(dx_exp, "dx_exp")
        backward_fn(x3, g3, dx3, cache.stats, gstats, cache.gamma.q, k_base - dx_exp, q,
                    dy.exp - dgamma_exp, dgamma, dbeta, wide, _NO_COUNT)
    return (QTensor(dx3 if rows else _from_ncl(dx3, cache.shape, out), dx_exp),
            QTensor(dgamma, dgamma_exp), QTensor(dbeta, dy.exp))


def l1bn_update_running(running_mean: np.ndarray, running_dev: np.ndarray, cache: L1BNCache,
                        momentum_q: int) -> None:
    """Update int64 running statistics in place from a training forward.

    ``running_mean`` and ``running_dev`` (the running L1 deviation) hold codes with exponent
    :data:`~qkernels.fixedpoint.RUN_EXP`; ``momentum_q / 2**MOMENTUM_BITS`` is the momentum
    (torch's convention: ``new = (1 - momentum)*old + momentum*batch``).
    """
    n_channels = cache.stats.shape[0]
    for a, name in ((running_mean, "running_mean"), (running_dev, "running_dev")):
        check_array(a, name, (np.int64,), (1,))
        if a.shape[0] != n_channels:
            raise ValueError(f"{name} has {a.shape[0]} entries, expected {n_channels}")
    if not 0 <= momentum_q <= (1 << MOMENTUM_BITS):
        raise ValueError(f"momentum_q={momentum_q} is outside 0..2**{MOMENTUM_BITS}")
    running_update(running_mean, running_dev, cache.stats, cache.count, cache.x_exp, momentum_q)


def l1bn_fold(gamma: QTensor, beta: QTensor, running_mean: np.ndarray, running_dev: np.ndarray,
              *, x_exp: int, out_bits: int, out_exp: int, eps_log2: int | None = None,
              x_bits: int = 8) -> np.ndarray:
    """Fold inference L1BN into one (multiplier A, offset B, shift sh) per channel.

    Returns an int64 array of shape (C, 3); an input code ``x`` maps to
    ``saturate((A*x + B) >> sh, 2**(out_bits-1) - 1)``. ``x_bits`` is the width of the input
    codes the fold will be applied to: up to 8 (int8) the int8 fold; 9..16 (int16) a fold with
    ``|A|*2**15 + |B| < 2**63``, valid for every int16 code (and for int8 codes too).
    """
    x_bits = check_bits(x_bits, "x_bits")
    out_bits = check_bits(out_bits, "out_bits")
    out_exp = check_exp(out_exp, "out_exp")
    x_exp = check_exp(x_exp, "x_exp")
    for a, name in ((running_mean, "running_mean"), (running_dev, "running_dev")):
        check_array(a, name, (np.int64,), (1,))
    _check_affine(gamma, beta, running_mean.shape[0])
    _check_offset(beta, out_exp)
    eps_shift, use_eps = _eps_shift(eps_log2, x_exp)
    return inference_params(gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp,
                            running_mean, running_dev, x_exp, eps_shift, use_eps, x_bits > 8)


def _check_fold16(folded: np.ndarray) -> None:
    """ValueError unless every row (A, B, sh) keeps |A*x + B| < 2**63 for all int16 x."""
    for a, b, sh in folded.tolist():
        if not (0 <= sh <= 62 and abs(a) * (1 << 15) + abs(b) < (1 << 63)):
            raise ValueError("folded has a row (A, B, sh) that overflows int64 on int16 codes; "
                             "fold with l1bn_fold(..., x_bits=<the input width, 9..16>)")


def l1bn_inference(x: QTensor, folded: np.ndarray, *, out_bits: int, out_exp: int,
                   parallel: bool = True) -> QTensor:
    """Apply folded inference parameters from :func:`l1bn_fold` to int8 or int16 codes.

    int16 codes need a fold made with ``x_bits`` of 9..16 (``|A|*2**15 + |B| < 2**63`` on every
    row, checked here: a ValueError names ``folded`` otherwise).
    """
    check_qtensor(x, "x")
    check_array(x.q, "x.q", (np.int8, np.int16), (2, 4))
    check_array(folded, "folded", (np.int64,), (2,))
    if folded.shape != (x.q.shape[1], 3):
        raise ValueError(f"folded has shape {folded.shape}, expected ({x.q.shape[1]}, 3)")
    out_bits = check_bits(out_bits, "out_bits")
    x3 = _as_ncl(x.q)
    y3 = _output_ncl(None, "out", x.q.shape, out_bits)
    if x3.dtype != np.int8:
        _check_fold16(folded)
    (_affine_parallel if parallel else _affine_serial)(x3, y3, folded, qmax(out_bits), _NO_COUNT)
    return QTensor(_from_ncl(y3, x.q.shape, None), check_exp(out_exp, "out_exp"))


def count_ops(shape: tuple, eps_log2: int | None = None, seed: int = 0, *, x_bits: int = 8,
              dy_bits: int | None = None) -> dict[str, dict]:
    """Operations one L1BN forward and backward perform on random codes of ``shape``.

    ``x_bits`` and ``dy_bits`` (default ``x_bits``) are the widths of x and dy codes (up to 8:
    int8, 9..16: int16). Runs the serial drivers with the counter and returns
    ``{"forward": {op: n}, "backward": {op: n}}`` with Table IV's op names.
    """
    x_bits = check_bits(x_bits, "x_bits")
    dy_bits = x_bits if dy_bits is None else check_bits(dy_bits, "dy_bits")
    rng = np.random.default_rng(seed)

    def codes(bits):
        q = int(qmax(bits))
        return rng.integers(-q, q + 1, size=shape).astype(code_dtype(bits))

    n_channels = shape[1]
    gamma = QTensor(np.full(n_channels, 1 << 12, dtype=np.int32), -12)
    beta = QTensor(np.zeros(n_channels, dtype=np.int32), -12)
    eps_shift, use_eps = _eps_shift(eps_log2, -4)
    x3 = _as_ncl(codes(x_bits))
    y3 = np.empty_like(x3)
    stats = np.empty((n_channels, N_STATS), dtype=np.int64)
    fwd = np.zeros(8, dtype=np.int64)
    _stats_serial(x3, eps_shift, use_eps, stats, fwd)
    m = np.int64(x3.shape[0] * x3.shape[2])
    _apply_serial(x3, y3, m, gamma.q, 8, beta.q, 8, qmax(8), x3.dtype != np.int8, stats, fwd)
    g3 = _as_ncl(codes(dy_bits))
    wide = x3.dtype != np.int8 or g3.dtype != np.int8
    bwd = np.zeros(8, dtype=np.int64)
    gstats = np.empty((n_channels, N_GSTATS), dtype=np.int64)
    _grad_stats_serial(x3, g3, gstats, bwd)
    _grad_apply_serial(x3, g3, np.empty_like(g3), m, stats, gstats, gamma.q, 0, qmax(8), 16,
                       np.empty(n_channels, np.int64), np.empty(n_channels, np.int64), wide, bwd)
    return {"forward": dict(zip(OP_NAMES, map(int, fwd))),
            "backward": dict(zip(OP_NAMES, map(int, bwd)))}
