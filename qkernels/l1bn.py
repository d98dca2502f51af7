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

Drivers run the same per-channel worker serially or with ``prange`` over channels, so each
channel's sums stay on one thread and results do not depend on the thread count.

Codes of up to 8 bits (int8) take the int8 kernels; 9..16-bit codes (int16) for x, dy or both
take the 16-bit kernels (``*16*`` below), which keep the same contract with wider partial sums,
two-limb per-channel integers where int64 is not enough, and a centred per-element affine
``saturate((A*(x - c) + B) >> sh)`` (``docs/l1bn-integer.md``, section 12).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import _i32
from ._jit import serial_and_parallel
from .fixedpoint import (
    CENTRE_MAX,
    M_MAX,
    MOMENTUM_BITS,
    OFFSET_MAX,
    RUN_EXP,
    SLOPE_MAX_LOG2,
    affine_params,
    affine_params_c,
    bit_length,
    centred_lanes,
    dy_add,
    dy_mul,
    dy_norm,
    dy_recip,
    dy_to_fixed,
    fits_int32,
    floor_div_by_recip,
    grad_p,
    qmax,
    round_shift,
    saturate,
    wide_dy_norm,
)
from .format import QTensor, check_array, check_bits, check_exp, check_qtensor, code_dtype

# ---------------------------------------------------------------------------------------------
# Operation counter slots (Table IV's columns). Workers tally into ``cnt`` when it is non-empty;
# the public functions pass an empty array, so counting costs one branch per row.
SIGN, ABS, ADD, SUB, MUL, DIV, SQUARE, SQRT = range(8)
OP_NAMES = ("SIGN", "ABS", "ADD", "SUB", "MUL", "DIV", "SQUARE", "SQRT")

# Columns of the per-channel statistics a forward leaves for its backward.
ST_SUM, ST_DEV, ST_SIGNSUM, ST_TLO, ST_THI, ST_RMANT, ST_REXP, ST_MIN, ST_MAX, N_STATS = range(10)
# Columns of the per-channel error statistics of a backward.
GS_SUM, GS_SUMX, GS_MIN, GS_MAX, N_GSTATS = range(5)

_NO_COUNT = np.zeros(0, dtype=np.int64)


@njit(cache=True, inline="always")
def _tally(cnt, op, n):
    if cnt.shape[0]:
        cnt[op] += n


# ---------------------------------------------------------------------------------------------
# Per-element passes over one channel of x with shape (N, C, L). Each loops over the channel's
# N rows as 1-D views indexed from 0 (the form LLVM vectorizes). They are separate functions,
# not inlined into the workers: inlined together, LLVM vectorizes the second pass of a worker
# about half as well (measured: backward 0.30 vs 0.15 ns per element). Sums go into narrow partials
# over blocks short enough that they cannot overflow, then into int64; the explicit casts on
# every step stop Numba from widening the lanes to int64 (64 int8 codes per AVX-512 vector
# instead of 8).

#: Codes (or sign*code, |.| <= 128) summed into one int16 partial: |partial| <= 128*128 = 2**14.
BLOCK16 = 128
#: int8*int8 products (|p| <= 2**14) summed into one int32 partial: 2**16 * 2**14 <= 2**30.
BLOCK32 = 1 << 16


@njit(cache=True)
def _sum_pass(x, c, cnt):
    """S = sum of the channel's codes (add only)."""
    total = np.int64(0)
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], BLOCK16):
            block = row[start:start + BLOCK16]
            part = np.int16(0)
            for i in range(block.shape[0]):
                part = np.int16(part + block[i])
            total += part
        _tally(cnt, ADD, row.shape[0])
    return total


@njit(cache=True)
def _sum_range_pass(x, c, cnt):
    """S, and the smallest and largest code (for an output exponent chosen from the range)."""
    total = np.int64(0)
    lo = x[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], BLOCK16):
            block = row[start:start + BLOCK16]
            part = np.int16(0)
            for i in range(block.shape[0]):
                v = block[i]
                part = np.int16(part + v)
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            total += part
        _tally(cnt, ADD, row.shape[0])
    return total, np.int64(lo), np.int64(hi)


@njit(cache=True)
def _sign_pass(x, c, t_lo, t_hi, cnt):
    """sum(s*x) and sum(s) for s = sgn(x - mu) = [x >= t_hi] - [x <= t_lo]."""
    lo = np.int16(t_lo)  # thresholds lie in [-129, 128]
    hi = np.int16(t_hi)
    sx = np.int64(0)
    ss = np.int64(0)
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], BLOCK16):
            block = row[start:start + BLOCK16]
            part_sx = np.int16(0)
            part_s = np.int16(0)
            for i in range(block.shape[0]):
                v = np.int16(block[i])
                s = np.int16(np.int16(v >= hi) - np.int16(v <= lo))
                part_sx = np.int16(part_sx + np.int16(s * v))
                part_s = np.int16(part_s + s)
            sx += part_sx
            ss += part_s
        _tally(cnt, SIGN, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sx, ss


@njit(cache=True)
def _affine_pass(x, y, c, a, b, sh, q, cnt):
    """y = saturate((a*x + b) >> sh): one multiply-and-shift per element."""
    narrow = fits_int32(a, abs(b), sh)
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
def _grad_sums_pass(x, g, c, cnt):
    """sum(g) and sum(g*x) over the channel."""
    sg = np.int64(0)
    sgx = np.int64(0)
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        for start in range(0, row.shape[0], BLOCK32):
            block = row[start:start + BLOCK32]
            gblock = grow[start:start + BLOCK32]
            part_g = np.int32(0)
            part_gx = np.int32(0)
            for i in range(block.shape[0]):
                gv = gblock[i]
                part_g = np.int32(part_g + gv)
                part_gx = np.int32(part_gx + np.int16(gv * block[i]))
            sg += part_g
            sgx += part_gx
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sg, sgx


@njit(cache=True)
def _grad_sums_range_pass(x, g, c, cnt):
    """sum(g), sum(g*x), and the smallest and largest g (for dx's exponent)."""
    sg = np.int64(0)
    sgx = np.int64(0)
    lo = g[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        for start in range(0, row.shape[0], BLOCK32):
            block = row[start:start + BLOCK32]
            gblock = grow[start:start + BLOCK32]
            part_g = np.int32(0)
            part_gx = np.int32(0)
            for i in range(block.shape[0]):
                gv = gblock[i]
                part_g = np.int32(part_g + gv)
                part_gx = np.int32(part_gx + np.int16(gv * block[i]))
                lo = gv if gv < lo else lo
                hi = gv if gv > hi else hi
            sg += part_g
            sgx += part_gx
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sg, sgx, np.int64(lo), np.int64(hi)


@njit(cache=True)
def _grad_affine_pass(x, g, dx, c, a, b, sh, t_lo, t_hi, q, cnt):
    """dx = saturate((a*g + b[s+1]) >> sh) with s = sgn(x - mu) selecting the offset."""
    narrow = fits_int32(a, max(abs(b[0]), abs(b[1]), abs(b[2])), sh)
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


# ---------------------------------------------------------------------------------------------
# Per-channel arithmetic shared by the kernels and the oracle (all integer).


@njit(cache=True)
def mean_thresholds(s, m, inv_m_mant, inv_m_exp):
    """Integer thresholds of sgn(m*x - s): x <= t_lo gives -1, x >= t_hi gives +1."""
    t = floor_div_by_recip(s, m, inv_m_mant, inv_m_exp)
    t_lo = t - 1 if m * t == s else t
    return t_lo, t + 1


@njit(cache=True)
def dev_reciprocal(dev, m, eps_shift, use_eps):
    """Dyadic 1/(D + m*m*2**eps_shift), or (0, 0) for a constant channel without epsilon."""
    dm, de = dy_norm(dev, 0)
    if use_eps:
        dm, de = dy_add(dm, de, *dy_norm(m * m, eps_shift))
    if dm == 0:
        return np.int64(0), np.int64(0)
    return dy_recip(dm, de)


@njit(cache=True)
def forward_params(s, m, rm, re, gamma_q, gamma_shift, beta_q, beta_shift):
    """(A, B, sh) of the training forward for one channel.

    y = gamma_lsb * m*(m*x - S)/D_eps + beta_lsb, i.e. slope K = gamma_q*m/D_eps *
    2**gamma_shift per unit of u = m*x - S and offset beta_q * 2**beta_shift (output LSBs).
    """
    km, ke = dy_mul(*dy_norm(gamma_q * m, gamma_shift), rm, re)
    if rm == 0:
        km, ke = np.int64(0), np.int64(0)
    om, oe = dy_norm(beta_q, beta_shift)
    a, b, sh = affine_params(km, ke, m, s, np.full(1, om), np.full(1, oe))
    return a, b[0], sh


@njit(cache=True)
def backward_params(s, m, sign_sum, rm, re, sg, sgx, gamma_q, k_shift):
    """(A, [B_neg, B_zero, B_pos], sh) of equation (20) for one channel.

    dx = K*(m*g - sum g) - K*(P/D_eps)*(m*s - sum s), with K = gamma_q*m/D_eps * 2**k_shift and
    P = sum g*(m*x - S) = m*sum(g*x) - S*sum(g): affine in g, with one offset per sign s.
    """
    if rm == 0:
        return np.int64(0), np.zeros(3, dtype=np.int64), np.int64(1)
    p = m * sgx - s * sg
    km, ke = dy_mul(*dy_norm(gamma_q * m, k_shift), rm, re)
    kqm, kqe = dy_mul(km, ke, *dy_mul(*dy_norm(p, 0), rm, re))
    om = np.empty(3, dtype=np.int64)
    oe = np.empty(3, dtype=np.int64)
    for i in range(3):
        om[i], oe[i] = dy_mul(kqm, kqe, *dy_norm(sign_sum - m * (i - 1), 0))
    # The offsets grow with the slope: past the slope clamp, scale the whole affine down by a
    # power of two instead of clamping the slope alone. Signs and saturated outputs are kept;
    # unsaturated ones shrink by that power of two (outside the accuracy contract anyway).
    excess = ke + bit_length(km) - SLOPE_MAX_LOG2 if km != 0 else np.int64(0)
    if excess > 0:
        ke -= excess
        for i in range(3):
            oe[i] -= excess
    return affine_params(km, ke, m, sg, om, oe)


@njit(cache=True)
def dgamma_code(m, p, rm, re, shift):
    """round(sum(g*xhat) * 2**shift) = round(m*P/D_eps * 2**shift)."""
    if rm == 0 or p == 0:
        return np.int64(0)
    dm, de = dy_mul(*dy_mul(*dy_norm(p, 0), rm, re), *dy_norm(m, 0))
    return dy_to_fixed(dm, de, shift)


# ---------------------------------------------------------------------------------------------
# Per-channel workers and their serial / parallel drivers.


@njit(cache=True)
def _inv_m(x, cnt):
    """1/m as a dyadic (mant, exp) array: one division per call, shared by all channels."""
    out = np.empty(2, dtype=np.int64)
    out[0], out[1] = dy_recip(*dy_norm(np.int64(x.shape[0] * x.shape[2]), 0))
    _tally(cnt, DIV, 1)
    return out


@njit(cache=True, inline="always")
def _stats_channel(x, c, inv_m, eps_shift, use_eps, want_range, stats, cnt):
    """Forward statistics of one channel: S, D, sum of signs, thresholds, 1/D_eps, and (when
    ``want_range``) the smallest and largest code."""
    m = np.int64(x.shape[0] * x.shape[2])
    if want_range:
        s, lo, hi = _sum_range_pass(x, c, cnt)
    else:
        s, lo, hi = _sum_pass(x, c, cnt), np.int64(0), np.int64(0)
    t_lo, t_hi = mean_thresholds(s, m, inv_m[0], inv_m[1])
    sx, ss = _sign_pass(x, c, t_lo, t_hi, cnt)
    dev = m * sx - s * ss
    rm, re = dev_reciprocal(dev, m, eps_shift, use_eps)
    # thresholds (2 MUL), D (2 MUL, 1 SUB), epsilon (1 MUL, 1 ADD), reciprocal (1 DIV)
    _tally(cnt, MUL, 4 + use_eps)
    _tally(cnt, ADD, use_eps)
    _tally(cnt, SUB, 1)
    _tally(cnt, DIV, 1)
    st = stats[c]
    st[ST_SUM] = s
    st[ST_DEV] = dev
    st[ST_SIGNSUM] = ss
    st[ST_TLO] = t_lo
    st[ST_THI] = t_hi
    st[ST_RMANT] = rm
    st[ST_REXP] = re
    st[ST_MIN] = lo
    st[ST_MAX] = hi


@njit(cache=True, inline="always")
def _apply_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt):
    """y = gamma*xhat + beta for one channel, from its statistics."""
    m = np.int64(x.shape[0] * x.shape[2])
    st = stats[c]
    a, b, sh = forward_params(st[ST_SUM], m, st[ST_RMANT], st[ST_REXP], np.int64(gamma_q[c]),
                              gamma_shift, np.int64(beta_q[c]), beta_shift)
    _affine_pass(x, y, c, a, b, sh, q, cnt)
    _tally(cnt, MUL, 3)  # slope (2), affine (1)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 1)


# Drivers. With the output exponent given, one region does each channel's statistics and apply
# (the channel's data is still in cache); to choose it from the range, statistics of all
# channels come first, then the exponent, then the apply.


def _forward(x, y, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift, use_eps, q,
             stats, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _stats_channel(x, c, inv_m, eps_shift, use_eps, False, stats, cnt)
        _apply_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt)


_forward_serial, _forward_parallel = serial_and_parallel(_forward)


def _stats(x, eps_shift, use_eps, stats, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _stats_channel(x, c, inv_m, eps_shift, use_eps, True, stats, cnt)


_stats_serial, _stats_parallel = serial_and_parallel(_stats)


def _apply(x, y, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt):
    for c in prange(x.shape[1]):
        _apply_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt)


_apply_serial, _apply_parallel = serial_and_parallel(_apply)


@njit(cache=True, inline="always")
def _grad_stats_channel(x, g, c, want_range, gstats, cnt):
    if want_range:
        sg, sgx, lo, hi = _grad_sums_range_pass(x, g, c, cnt)
    else:
        sg, sgx = _grad_sums_pass(x, g, c, cnt)
        lo, hi = np.int64(0), np.int64(0)
    gs = gstats[c]
    gs[GS_SUM] = sg
    gs[GS_SUMX] = sgx
    gs[GS_MIN] = lo
    gs[GS_MAX] = hi


@njit(cache=True, inline="always")
def _grad_apply_channel(x, g, dx, c, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                        dbeta, cnt):
    m = np.int64(x.shape[0] * x.shape[2])
    st = stats[c]
    sg, sgx = gstats[c, GS_SUM], gstats[c, GS_SUMX]
    a, b, sh = backward_params(st[ST_SUM], m, st[ST_SIGNSUM], st[ST_RMANT], st[ST_REXP], sg,
                               sgx, np.int64(gamma_q[c]), k_shift)
    _grad_affine_pass(x, g, dx, c, a, b, sh, st[ST_TLO], st[ST_THI], q, cnt)
    dbeta[c] = sg
    dgamma[c] = dgamma_code(m, m * sgx - st[ST_SUM] * sg, st[ST_RMANT], st[ST_REXP],
                            dgamma_shift)
    # per channel: P (2 MUL, 1 SUB), slopes (4 MUL), three offsets (3 MUL, 3 SUB), affine
    # (2 MUL, 2 ADD, 1 SUB), dgamma (2 MUL)
    _tally(cnt, MUL, 13)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 5)


def _backward(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
              dbeta, cnt):
    for c in prange(x.shape[1]):
        _grad_stats_channel(x, g, c, False, gstats, cnt)
        _grad_apply_channel(x, g, dx, c, stats, gstats, gamma_q, k_shift, q, dgamma_shift,
                            dgamma, dbeta, cnt)


_backward_serial, _backward_parallel = serial_and_parallel(_backward)


def _grad_stats(x, g, gstats, cnt):
    for c in prange(x.shape[1]):
        _grad_stats_channel(x, g, c, True, gstats, cnt)


_grad_stats_serial, _grad_stats_parallel = serial_and_parallel(_grad_stats)


def _grad_apply(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                dbeta, cnt):
    for c in prange(x.shape[1]):
        _grad_apply_channel(x, g, dx, c, stats, gstats, gamma_q, k_shift, q, dgamma_shift,
                            dgamma, dbeta, cnt)


_grad_apply_serial, _grad_apply_parallel = serial_and_parallel(_grad_apply)


@njit(cache=True)
def _magnitude_exp(vm, ve):
    """Binary exponent bound of a dyadic: |v| < 2**result (very negative for 0)."""
    return ve + bit_length(vm) if vm != 0 else np.int64(-1 << 20)


@njit(cache=True)
def output_exponent(stats, m, gamma_q, gamma_exp, beta_q, beta_exp, bits):
    """Exponent of the forward's output chosen from its range: ``e = E - (bits - 1)``.

    ``E`` bounds the binary exponent of the largest |gamma*xhat + beta| over all channels,
    evaluated (dyadically) at each channel's smallest and largest code: the affine is monotone,
    so its extremes are there. Like the normalization, it depends on the input's exponent only
    through epsilon. An all-zero output gets ``beta_exp``.
    """
    top = np.int64(-1 << 20)
    for c in range(stats.shape[0]):
        st = stats[c]
        km, ke = dy_mul(*dy_norm(np.int64(gamma_q[c]) * m, gamma_exp), st[ST_RMANT], st[ST_REXP])
        if st[ST_RMANT] == 0:
            km, ke = np.int64(0), np.int64(0)
        bm, be = dy_norm(np.int64(beta_q[c]), beta_exp)
        for code in (st[ST_MIN], st[ST_MAX]):
            ym, ye = dy_add(*dy_mul(km, ke, *dy_norm(m * code - st[ST_SUM], 0)), bm, be)
            top = max(top, _magnitude_exp(ym, ye))
    if top < -(1 << 19):
        return np.int64(beta_exp)
    return top - (bits - 1)


@njit(cache=True)
def grad_exponent(stats, gstats, m, gamma_q, k_base, bits):
    """Exponent of the backward's dx chosen from a bound of its range: ``E - (bits - 1)``.

    ``k_base = gamma_exp + g_exp - x_exp`` (dx's exponent is then ``k_base - k_shift``).
    Per channel dx is affine in g with an offset linear in the sign s; ``E`` bounds its binary
    exponent at the channel's smallest and largest g with s = -1 and s = +1.
    """
    top = np.int64(-1 << 20)
    for c in range(stats.shape[0]):
        st = stats[c]
        gs = gstats[c]
        if st[ST_RMANT] == 0:
            continue
        p = m * gs[GS_SUMX] - st[ST_SUM] * gs[GS_SUM]
        km, ke = dy_mul(*dy_norm(np.int64(gamma_q[c]) * m, k_base), st[ST_RMANT], st[ST_REXP])
        kqm, kqe = dy_mul(km, ke, *dy_mul(*dy_norm(p, 0), st[ST_RMANT], st[ST_REXP]))
        for gv in (gs[GS_MIN], gs[GS_MAX]):
            am, ae = dy_mul(km, ke, *dy_norm(m * gv - gs[GS_SUM], 0))
            for sgn in (-1, 1):
                om, oe = dy_mul(kqm, kqe, *dy_norm(st[ST_SIGNSUM] - m * sgn, 0))
                top = max(top, _magnitude_exp(*dy_add(am, ae, om, oe)))
    if top < -(1 << 19):
        return np.int64(k_base)
    return top - (bits - 1)


def _affine(x, y, params, q, cnt):
    for c in prange(x.shape[1]):
        _affine_pass(x, y, c, params[c, 0], params[c, 1], params[c, 2], q, cnt)


_affine_serial, _affine_parallel = serial_and_parallel(_affine)


@njit(cache=True)
def inference_params(gamma_q, gamma_shift, beta_q, beta_shift, run_mean, run_dev, x_exp,
                     eps_shift, use_eps):
    """Fold running statistics into one (A, B, sh) per channel (Algorithm 1, step 9).

    The running mean is taken to ``f`` fractional bits of the input code (as many as keep
    |x*2**f - mu| < 2**31), so y = K*(x*2**f - mu_f) + beta with K = gamma/(sigma + eps)*2**-f.
    """
    n = gamma_q.shape[0]
    out = np.zeros((n, 3), dtype=np.int64)
    to_code = np.int64(RUN_EXP) - x_exp
    for c in range(n):
        mum, mue = dy_norm(run_mean[c], to_code)
        mag = max(np.int64(8), bit_length(mum) + mue + 1) if mum != 0 else np.int64(8)
        f = max(np.int64(0), np.int64(30) - mag)
        mu_f = saturate(dy_to_fixed(mum, mue, f), np.int64(1) << np.int64(30))
        sm, se = dy_norm(max(run_dev[c], np.int64(0)), to_code)
        if use_eps:
            sm, se = dy_add(sm, se, np.int64(1) << np.int64(30), eps_shift - 30)
        if sm == 0:
            km, ke = np.int64(0), np.int64(0)
        else:
            km, ke = dy_mul(*dy_norm(gamma_q[c], gamma_shift), *dy_recip(sm, se))
        om, oe = dy_norm(beta_q[c], beta_shift)
        a, b, sh = affine_params(km, ke - f, np.int64(1) << f, mu_f, np.full(1, om),
                                 np.full(1, oe))
        out[c, 0] = a
        out[c, 1] = b[0]
        out[c, 2] = sh
    return out


#: Running statistics saturate at +-2**44 codes (2**20 in real units at RUN_EXP = -24), so
#: momentum_q * (new - old) <= 2**16 * 2**45 stays far inside int64.
RUN_LIMIT = np.int64(1) << np.int64(44)


@njit(cache=True)
def _momentum_step(old, new, momentum_q, lim):
    """old + momentum*(new - old), momentum = momentum_q / 2**MOMENTUM_BITS, saturated."""
    old = saturate(old, lim)
    delta = saturate(new, lim) - old
    return saturate(old + round_shift(momentum_q * delta, MOMENTUM_BITS), lim)


@njit(cache=True)
def running_update(run_mean, run_dev, stats, m, x_exp, momentum_q):
    """In-place integer momentum update of the running mean and running L1 deviation."""
    inv_m = dy_recip(*dy_norm(m, 0))
    shift = x_exp - np.int64(RUN_EXP)
    lim = RUN_LIMIT
    for c in range(run_mean.shape[0]):
        mean = dy_to_fixed(*dy_mul(*dy_norm(stats[c, ST_SUM], 0), *inv_m), shift)
        dm, de = dy_mul(*dy_mul(*dy_norm(stats[c, ST_DEV], 0), *inv_m), *inv_m)
        dev = dy_to_fixed(dm, de, shift)
        run_mean[c] = _momentum_step(run_mean[c], mean, momentum_q, lim)
        run_dev[c] = _momentum_step(run_dev[c], dev, momentum_q, lim)


# ---------------------------------------------------------------------------------------------
# 16-bit codes. x and/or dy stored as int16 (9..16-bit codes, |code| <= 2**15) take these
# kernels; int8 x with int8 dy keeps the kernels above. The statistics and the derivation are
# the same; what differs (docs/l1bn-integer.md, section 12): wider partial sums, the backward's
# P formed in two limbs (it reaches 2**77), and the per-element affine is centred,
# ``y = saturate((A*(x - c) + B) >> sh)``, with c near where the affine crosses zero
# (:func:`~qkernels.fixedpoint.affine_params_c`), because ``u = m*x - S`` reaches 2**39.

#: int16 codes (|x| <= 2**15) summed into one int32 partial: |partial| <= 2**15 * 2**15 = 2**30.
BLOCK16W = 1 << 15


@njit(cache=True)
def _sum_range_pass16(x, c, cnt):
    """S and the smallest and largest code, for int16 codes (int32 partials)."""
    total = np.int64(0)
    lo = x[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], BLOCK16W):
            block = row[start:start + BLOCK16W]
            part = np.int32(0)
            for i in range(block.shape[0]):
                v = block[i]
                part = np.int32(part + v)
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            total += part
        _tally(cnt, ADD, row.shape[0])
    return total, np.int64(lo), np.int64(hi)


@njit(cache=True)
def _sign_pass16(x, c, t_lo, t_hi, cnt):
    """sum(s*x) and sum(s) for int16 codes (thresholds in [-2**15 - 1, 2**15]: int32)."""
    lo = np.int32(t_lo)
    hi = np.int32(t_hi)
    sx = np.int64(0)
    ss = np.int64(0)
    for n in range(x.shape[0]):
        row = x[n, c]
        for start in range(0, row.shape[0], BLOCK16W):
            block = row[start:start + BLOCK16W]
            part_sx = np.int32(0)
            part_s = np.int32(0)
            for i in range(block.shape[0]):
                v = np.int32(block[i])
                s = np.int32(np.int32(v >= hi) - np.int32(v <= lo))
                part_sx = np.int32(part_sx + np.int32(s * v))
                part_s = np.int32(part_s + s)
            sx += part_sx
            ss += part_s
        _tally(cnt, SIGN, row.shape[0])
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sx, ss


@njit(cache=True)
def _grad_sums_range_pass16(x, g, c, cnt):
    """sum(g), sum(g*x) and the smallest and largest g, for int8/int16 x and g in any mix:
    sum(g) in int32 partials (|g| <= 2**15), the products (|g*x| <= 2**30) in int64."""
    sg = np.int64(0)
    sgx = np.int64(0)
    lo = g[0, c, 0]
    hi = lo
    for n in range(x.shape[0]):
        row = x[n, c]
        grow = g[n, c]
        for start in range(0, row.shape[0], BLOCK16W):
            block = row[start:start + BLOCK16W]
            gblock = grow[start:start + BLOCK16W]
            part_g = np.int32(0)
            part_gx = np.int64(0)
            for i in range(block.shape[0]):
                gv = gblock[i]
                part_g = np.int32(part_g + gv)
                part_gx += np.int64(np.int32(gv) * np.int32(block[i]))
                lo = gv if gv < lo else lo
                hi = gv if gv > hi else hi
            sg += part_g
            sgx += part_gx
        _tally(cnt, MUL, row.shape[0])
        _tally(cnt, ADD, 2 * row.shape[0])
    return sg, sgx, np.int64(lo), np.int64(hi)


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
def _grad_affine_pass_c(x, g, dx, c, a, b, cen, sh, t_lo, t_hi, q, lanes32, window, cnt):
    """dx = saturate((a*(g - cen[s+1]) + b[s+1]) >> sh), s = sgn(x - mu) picking the centre
    and offset of its affine."""
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
def _affine_pass16(x, y, c, a, b, sh, q, cnt):
    """Folded inference on int16 codes: y = saturate((a*x + b) >> sh); the fold (or the check
    in l1bn_inference) guarantees |a|*2**15 + |b| < 2**63."""
    narrow = sh <= 30 and abs(a) * (1 << 15) + abs(b) < (np.int64(1) << np.int64(31))
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


# Per-channel arithmetic of the 16-bit kernels (shared with the oracle).


@njit(cache=True)
def forward_params16(s, m, t, rm, re, gamma_q, gamma_shift, beta_q, beta_shift, lo, hi):
    """(A, B, c, sh) of the training forward for one channel of 16-bit codes in [lo, hi]:
    y = saturate((A*(x - c) + B) >> sh), centred on c = t = floor(S/m)."""
    km, ke = dy_mul(*dy_norm(gamma_q * m, gamma_shift), rm, re)
    if rm == 0:
        km, ke = np.int64(0), np.int64(0)
    om, oe = dy_norm(beta_q, beta_shift)
    a, b, sh = affine_params_c(km, ke, m, s, np.full(1, om), np.full(1, oe),
                               np.full(1, np.int64(t)), lo, hi)
    return a, b[0], np.int64(t), sh


@njit(cache=True)
def grad_p_dyadic(s, m, t, sg, sgx):
    """P = m*sum(g*x) - S*sum(g) (exact, two limbs) as a dyadic, truncated toward zero."""
    h, lo = grad_p(s, m, t, sg, sgx)
    return wide_dy_norm(h, lo, 0)


@njit(cache=True)
def backward_params16(s, m, t, sign_sum, rm, re, sg, sgx, glo, ghi, gamma_q, k_shift, im, ie):
    """(A, [B_neg, B_zero, B_pos], [c_neg, c_zero, c_pos], sh) of equation (20) for one channel
    with 16-bit x or g (g in [glo, ghi]); dx = saturate((A*(g - c_s) + B_s) >> sh).

    The same affine as :func:`backward_params` (slope K per unit of m*g - sum g, one offset per
    sign), with P exact in two limbs and each sign's affine centred on the integer nearest its
    root g* = (sum g - (P/D_eps)*(sum s - m*s))/m, computed with ``1/m ~ im * 2**ie``.
    """
    if rm == 0:
        return (np.int64(0), np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64),
                np.int64(1))
    pm, pe = grad_p_dyadic(s, m, t, sg, sgx)
    prm, pre = dy_mul(pm, pe, rm, re)  # P/D_eps, |.| <= (max g - min g)/2 (+ rounding)
    km, ke = dy_mul(*dy_norm(gamma_q * m, k_shift), rm, re)
    kqm, kqe = dy_mul(km, ke, prm, pre)
    om = np.empty(3, dtype=np.int64)
    oe = np.empty(3, dtype=np.int64)
    cen = np.empty(3, dtype=np.int64)
    sgm, sge = dy_norm(sg, 0)
    for i in range(3):
        vm, ve = dy_norm(sign_sum - m * (i - 1), 0)
        om[i], oe[i] = dy_mul(kqm, kqe, vm, ve)
        rtm, rte = dy_mul(*dy_add(sgm, sge, *dy_mul(-prm, pre, vm, ve)), im, ie)
        cen[i] = saturate(dy_to_fixed(rtm, rte, 0), np.int64(CENTRE_MAX))
    excess = ke + bit_length(km) - SLOPE_MAX_LOG2 if km != 0 else np.int64(0)
    if excess > 0:
        ke -= excess
        for i in range(3):
            oe[i] -= excess
    a, b, sh = affine_params_c(km, ke, m, sg, om, oe, cen, glo, ghi)
    return a, b, cen, sh


@njit(cache=True)
def dgamma_code16(m, pm, pe, rm, re, shift):
    """round(m*P/D_eps * 2**shift) from P's dyadic (pm, pe)."""
    if rm == 0 or pm == 0:
        return np.int64(0)
    dm, de = dy_mul(*dy_mul(pm, pe, rm, re), *dy_norm(m, 0))
    return dy_to_fixed(dm, de, shift)


@njit(cache=True)
def _centred_lanes_of(a, b, cen, sh, q, lo, hi):
    """int32 lanes and clamp window for one channel's centred affines over codes [lo, hi]."""
    b_max = np.int64(0)
    d_max = np.int64(0)
    for j in range(b.shape[0]):
        b_max = max(b_max, abs(b[j]))
        d_max = max(d_max, abs(lo - cen[j]), abs(hi - cen[j]))
    return centred_lanes(a, b_max, d_max, sh, q)


@njit(cache=True, inline="always")
def _stats16_channel(x, c, inv_m, eps_shift, use_eps, stats, cnt):
    """Forward statistics of one channel of int16 codes (always with the range)."""
    m = np.int64(x.shape[0] * x.shape[2])
    s, lo, hi = _sum_range_pass16(x, c, cnt)
    t_lo, t_hi = mean_thresholds(s, m, inv_m[0], inv_m[1])
    sx, ss = _sign_pass16(x, c, t_lo, t_hi, cnt)
    dev = m * sx - s * ss
    rm, re = dev_reciprocal(dev, m, eps_shift, use_eps)
    _tally(cnt, MUL, 4 + use_eps)
    _tally(cnt, ADD, use_eps)
    _tally(cnt, SUB, 1)
    _tally(cnt, DIV, 1)
    st = stats[c]
    st[ST_SUM] = s
    st[ST_DEV] = dev
    st[ST_SIGNSUM] = ss
    st[ST_TLO] = t_lo
    st[ST_THI] = t_hi
    st[ST_RMANT] = rm
    st[ST_REXP] = re
    st[ST_MIN] = lo
    st[ST_MAX] = hi


@njit(cache=True, inline="always")
def _apply16_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt):
    m = np.int64(x.shape[0] * x.shape[2])
    st = stats[c]
    a, b, cen, sh = forward_params16(st[ST_SUM], m, st[ST_THI] - 1, st[ST_RMANT], st[ST_REXP],
                                     np.int64(gamma_q[c]), gamma_shift, np.int64(beta_q[c]),
                                     beta_shift, st[ST_MIN], st[ST_MAX])
    lanes32, window = _centred_lanes_of(a, np.full(1, b), np.full(1, cen), sh, q, st[ST_MIN],
                                        st[ST_MAX])
    _affine_pass_c(x, y, c, a, b, cen, sh, q, lanes32, window, cnt)
    _tally(cnt, MUL, 3)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 1)


def _forward16(x, y, gamma_q, gamma_shift, beta_q, beta_shift, eps_shift, use_eps, q,
               stats, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _stats16_channel(x, c, inv_m, eps_shift, use_eps, stats, cnt)
        _apply16_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt)


_forward16_serial, _forward16_parallel = serial_and_parallel(_forward16)


def _stats16(x, eps_shift, use_eps, stats, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _stats16_channel(x, c, inv_m, eps_shift, use_eps, stats, cnt)


_stats16_serial, _stats16_parallel = serial_and_parallel(_stats16)


def _apply16(x, y, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt):
    for c in prange(x.shape[1]):
        _apply16_channel(x, y, c, gamma_q, gamma_shift, beta_q, beta_shift, q, stats, cnt)


_apply16_serial, _apply16_parallel = serial_and_parallel(_apply16)


@njit(cache=True, inline="always")
def _grad_stats16_channel(x, g, c, gstats, cnt):
    sg, sgx, lo, hi = _grad_sums_range_pass16(x, g, c, cnt)
    gs = gstats[c]
    gs[GS_SUM] = sg
    gs[GS_SUMX] = sgx
    gs[GS_MIN] = lo
    gs[GS_MAX] = hi


@njit(cache=True, inline="always")
def _grad_apply16_channel(x, g, dx, c, stats, gstats, inv_m, gamma_q, k_shift, q, dgamma_shift,
                          dgamma, dbeta, cnt):
    m = np.int64(x.shape[0] * x.shape[2])
    st = stats[c]
    gs = gstats[c]
    t = st[ST_THI] - 1
    a, b, cen, sh = backward_params16(st[ST_SUM], m, t, st[ST_SIGNSUM], st[ST_RMANT],
                                      st[ST_REXP], gs[GS_SUM], gs[GS_SUMX], gs[GS_MIN],
                                      gs[GS_MAX], np.int64(gamma_q[c]), k_shift, inv_m[0],
                                      inv_m[1])
    lanes32, window = _centred_lanes_of(a, b, cen, sh, q, gs[GS_MIN], gs[GS_MAX])
    _grad_affine_pass_c(x, g, dx, c, a, b, cen, sh, st[ST_TLO], st[ST_THI], q, lanes32, window,
                        cnt)
    dbeta[c] = gs[GS_SUM]
    pm, pe = grad_p_dyadic(st[ST_SUM], m, t, gs[GS_SUM], gs[GS_SUMX])
    dgamma[c] = dgamma_code16(m, pm, pe, st[ST_RMANT], st[ST_REXP], dgamma_shift)
    # per channel: P (3 MUL, 2 SUB), slopes (4 MUL), three offsets and roots (9 MUL, 6 SUB),
    # affine (2 MUL, 2 ADD, 1 SUB), dgamma (2 MUL)
    _tally(cnt, MUL, 20)
    _tally(cnt, ADD, 2)
    _tally(cnt, SUB, 9)


def _backward16(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                dbeta, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _grad_stats16_channel(x, g, c, gstats, cnt)
        _grad_apply16_channel(x, g, dx, c, stats, gstats, inv_m, gamma_q, k_shift, q,
                              dgamma_shift, dgamma, dbeta, cnt)


_backward16_serial, _backward16_parallel = serial_and_parallel(_backward16)


def _grad_stats16(x, g, gstats, cnt):
    for c in prange(x.shape[1]):
        _grad_stats16_channel(x, g, c, gstats, cnt)


_grad_stats16_serial, _grad_stats16_parallel = serial_and_parallel(_grad_stats16)


def _grad_apply16(x, g, dx, stats, gstats, gamma_q, k_shift, q, dgamma_shift, dgamma,
                  dbeta, cnt):
    inv_m = _inv_m(x, cnt)
    for c in prange(x.shape[1]):
        _grad_apply16_channel(x, g, dx, c, stats, gstats, inv_m, gamma_q, k_shift, q,
                              dgamma_shift, dgamma, dbeta, cnt)


_grad_apply16_serial, _grad_apply16_parallel = serial_and_parallel(_grad_apply16)


@njit(cache=True)
def grad_exponent16(stats, gstats, m, gamma_q, k_base, bits):
    """:func:`grad_exponent` for 16-bit x or g: the same corner bound, with P in two limbs."""
    top = np.int64(-1 << 20)
    for c in range(stats.shape[0]):
        st = stats[c]
        gs = gstats[c]
        if st[ST_RMANT] == 0:
            continue
        pm, pe = grad_p_dyadic(st[ST_SUM], m, st[ST_THI] - 1, gs[GS_SUM], gs[GS_SUMX])
        km, ke = dy_mul(*dy_norm(np.int64(gamma_q[c]) * m, k_base), st[ST_RMANT], st[ST_REXP])
        kqm, kqe = dy_mul(km, ke, *dy_mul(pm, pe, st[ST_RMANT], st[ST_REXP]))
        for gv in (gs[GS_MIN], gs[GS_MAX]):
            am, ae = dy_mul(km, ke, *dy_norm(m * gv - gs[GS_SUM], 0))
            for sgn in (-1, 1):
                om, oe = dy_mul(kqm, kqe, *dy_norm(st[ST_SIGNSUM] - m * sgn, 0))
                top = max(top, _magnitude_exp(*dy_add(am, ae, om, oe)))
    if top < -(1 << 19):
        return np.int64(k_base)
    return top - (bits - 1)


def _affine16(x, y, params, q, cnt):
    for c in prange(x.shape[1]):
        _affine_pass16(x, y, c, params[c, 0], params[c, 1], params[c, 2], q, cnt)


_affine16_serial, _affine16_parallel = serial_and_parallel(_affine16)


@njit(cache=True)
def inference_params16(gamma_q, gamma_shift, beta_q, beta_shift, run_mean, run_dev, x_exp,
                       eps_shift, use_eps):
    """:func:`inference_params` for 16-bit input codes: (A, B, sh) per channel with
    |A|*2**15 + |B| < 2**63, so that y = saturate((A*x + B) >> sh) is exact in int64 for every
    int16 x.

    The running mean is taken to f = max(0, 30 - max(16, b + 1)) <= 14 fractional bits
    (|mu| < 2**b codes), so |x*2**f - mu_f| < 2**29 + 2**30, and the affine is
    :func:`~qkernels.fixedpoint.affine_params_c` centred on 0 over [-2**15, 2**15 - 1]:
    narrow, or wide with |A| = |Kf|*2**f <= 2**44 and |B| < 2**61.
    """
    n = gamma_q.shape[0]
    out = np.zeros((n, 3), dtype=np.int64)
    to_code = np.int64(RUN_EXP) - x_exp
    zero = np.zeros(1, dtype=np.int64)
    for c in range(n):
        mum, mue = dy_norm(run_mean[c], to_code)
        mag = max(np.int64(16), bit_length(mum) + mue + 1) if mum != 0 else np.int64(16)
        f = max(np.int64(0), np.int64(30) - mag)
        mu_f = saturate(dy_to_fixed(mum, mue, f), np.int64(1) << np.int64(30))
        sm, se = dy_norm(max(run_dev[c], np.int64(0)), to_code)
        if use_eps:
            sm, se = dy_add(sm, se, np.int64(1) << np.int64(30), eps_shift - 30)
        if sm == 0:
            km, ke = np.int64(0), np.int64(0)
        else:
            km, ke = dy_mul(*dy_norm(gamma_q[c], gamma_shift), *dy_recip(sm, se))
        om, oe = dy_norm(beta_q[c], beta_shift)
        a, b, sh = affine_params_c(km, ke - f, np.int64(1) << f, mu_f, np.full(1, om),
                                   np.full(1, oe), zero, np.int64(-(1 << 15)),
                                   np.int64((1 << 15) - 1))
        out[c, 0] = a
        out[c, 1] = b[0]
        out[c, 2] = sh
    return out


# ---------------------------------------------------------------------------------------------
# Public API: validate, reshape to (N, C, L), call a driver, reshape back.


class L1BNCache(NamedTuple):
    """What a training forward leaves for its backward and for the running statistics."""

    x: np.ndarray  # the input codes as (N, C, L)
    shape: tuple  # the caller's input shape
    x_exp: int
    gamma: QTensor
    eps_log2: int | None
    stats: np.ndarray  # int64 (C, N_STATS): sum, D, sum of signs, thresholds, 1/D, min, max


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


def _output_ncl(out: np.ndarray | None, name: str, shape: tuple, bits: int) -> np.ndarray:
    """An (N, C, L) array to write codes into: a view of ``out`` (4-D) or a new array."""
    dtype = code_dtype(bits)
    ncl = (1, shape[1], shape[0]) if len(shape) == 2 else (shape[0], shape[1], -1)
    if out is None:
        return np.empty(ncl if len(shape) == 2 else shape, dtype=dtype).reshape(ncl)
    check_array(out, name, (dtype,), (len(shape),))
    if out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous array of shape {shape}, got "
                         f"{out.shape}")
    return np.empty(ncl, dtype=dtype) if len(shape) == 2 else out.reshape(ncl)


def _check_input(x: np.ndarray, name: str) -> tuple[int, int]:
    check_array(x, name, (np.int8, np.int16), (2, 4))
    n_channels = x.shape[1]
    m = x.size // max(n_channels, 1)
    if n_channels == 0 or m == 0:
        raise ValueError(f"{name} has an empty dimension: shape {x.shape}")
    if m == 1:
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


def l1bn_forward(x: QTensor, gamma: QTensor, beta: QTensor, *, out_bits: int,
                 out_exp: int | None = None, eps_log2: int | None = None,
                 out: np.ndarray | None = None, parallel: bool = True
                 ) -> tuple[QTensor, L1BNCache]:
    r"""Training-mode L1BN forward on int8 or int16 codes.

    .. math:: y = \gamma \frac{x - \mu_B}{\sigma_B + \epsilon} + \beta, \qquad
              \sigma_B = \frac{1}{m}\sum |x_i - \mu_B|

    Args:
        x: input codes, shape (N, C) or (N, C, H, W), with exponent: int8 (up to 8 bits) or
            int16 (9..16 bits; the 16-bit kernels, ``docs/l1bn-integer.md`` section 12).
        gamma, beta: per-channel int32 codes with their exponents.
        out_bits: width of the output codes (2..16; int8 storage up to 8, int16 above).
        out_exp: exponent of the output codes; None chooses it from the output's range
            (:func:`output_exponent`), as the requantizers do.
        eps_log2: epsilon = 2**eps_log2 in the input's real units; None for epsilon = 0, where a
            constant channel (sigma = 0) outputs beta and passes back no error.
        out: optional C-contiguous array (x's shape, int8 or int16 per out_bits) to write the
            codes into, so a training loop can reuse its buffers.
        parallel: run channels on all Numba threads (results are identical either way).

    Returns:
        ``(y, cache)``: the output codes (same shape as x) and what :func:`l1bn_backward` and
        :func:`l1bn_update_running` need.

    Every output code is within one LSB of the float64 evaluation of the same equations,
    rounded half up and saturated (``docs/l1bn-integer.md`` states the conditions).
    """
    check_qtensor(x, "x")
    n_channels, m = _check_input(x.q, "x.q")
    out_bits = check_bits(out_bits, "out_bits")
    _check_affine(gamma, beta, n_channels)
    eps_shift, use_eps = _eps_shift(eps_log2, x.exp)

    x3 = _as_ncl(x.q)
    stats = np.empty((n_channels, N_STATS), dtype=np.int64)
    y3 = _output_ncl(out, "out", x.q.shape, out_bits)
    q = (1 << (out_bits - 1)) - 1
    if x3.dtype == np.int8:
        stats_fn, apply_fn, forward_fn = ((_stats_parallel, _apply_parallel, _forward_parallel)
                                          if parallel else
                                          (_stats_serial, _apply_serial, _forward_serial))
    else:
        stats_fn, apply_fn, forward_fn = ((_stats16_parallel, _apply16_parallel,
                                           _forward16_parallel) if parallel else
                                          (_stats16_serial, _apply16_serial, _forward16_serial))
    if out_exp is None:
        stats_fn(x3, eps_shift, use_eps, stats, _NO_COUNT)
        out_exp = check_exp(int(output_exponent(stats, m, gamma.q, gamma.exp, beta.q,
                                                beta.exp, out_bits)), "out_exp")
        _check_offset(beta, out_exp)
        apply_fn(x3, y3, gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp, q, stats,
                 _NO_COUNT)
    else:
        out_exp = check_exp(out_exp, "out_exp")
        _check_offset(beta, out_exp)
        forward_fn(x3, y3, gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp, eps_shift,
                   use_eps, q, stats, _NO_COUNT)
    cache = L1BNCache(x3, x.q.shape, x.exp, gamma, eps_log2, stats)
    return QTensor(_from_ncl(y3, x.q.shape, out), out_exp), cache


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
            int8, the 16-bit kernels run (``docs/l1bn-integer.md`` section 12).
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

    g3 = _as_ncl(dy.q)
    n_channels = g3.shape[1]
    m = g3.shape[0] * g3.shape[2]
    gstats = np.empty((n_channels, N_GSTATS), dtype=np.int64)
    k_base = cache.gamma.exp + dy.exp - cache.x_exp
    dx3 = _output_ncl(out, "out", cache.shape, dx_bits)
    dgamma = np.empty(n_channels, dtype=np.int64)
    dbeta = np.empty(n_channels, dtype=np.int64)
    q = (1 << (dx_bits - 1)) - 1
    if cache.x.dtype == np.int8 and g3.dtype == np.int8:
        exponent_fn = grad_exponent
        stats_fn, apply_fn, backward_fn = (
            (_grad_stats_parallel, _grad_apply_parallel, _backward_parallel) if parallel else
            (_grad_stats_serial, _grad_apply_serial, _backward_serial))
    else:
        exponent_fn = grad_exponent16
        stats_fn, apply_fn, backward_fn = (
            (_grad_stats16_parallel, _grad_apply16_parallel, _backward16_parallel) if parallel
            else (_grad_stats16_serial, _grad_apply16_serial, _backward16_serial))
    if dx_exp is None:
        stats_fn(cache.x, g3, gstats, _NO_COUNT)
        dx_exp = check_exp(int(exponent_fn(cache.stats, gstats, m, cache.gamma.q, k_base,
                                           dx_bits)), "dx_exp")
        apply_fn(cache.x, g3, dx3, cache.stats, gstats, cache.gamma.q, k_base - dx_exp, q,
                 dy.exp - dgamma_exp, dgamma, dbeta, _NO_COUNT)
    else:
        dx_exp = check_exp(dx_exp, "dx_exp")
        backward_fn(cache.x, g3, dx3, cache.stats, gstats, cache.gamma.q, k_base - dx_exp, q,
                    dy.exp - dgamma_exp, dgamma, dbeta, _NO_COUNT)
    return (QTensor(_from_ncl(dx3, cache.shape, out), dx_exp), QTensor(dgamma, dgamma_exp),
            QTensor(dbeta, dy.exp))


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
    m = cache.x.shape[0] * cache.x.shape[2]
    running_update(running_mean, running_dev, cache.stats, m, cache.x_exp, momentum_q)


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
    fold = inference_params if x_bits <= 8 else inference_params16
    return fold(gamma.q, gamma.exp - out_exp, beta.q, beta.exp - out_exp, running_mean,
                running_dev, x_exp, eps_shift, use_eps)


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
    if x3.dtype == np.int8:
        (_affine_parallel if parallel else _affine_serial)(x3, y3, folded, qmax(out_bits),
                                                           _NO_COUNT)
    else:
        _check_fold16(folded)
        (_affine16_parallel if parallel else _affine16_serial)(x3, y3, folded, qmax(out_bits),
                                                               _NO_COUNT)
    return QTensor(_from_ncl(y3, x.q.shape, None), check_exp(out_exp, "out_exp"))


def count_ops(shape: tuple, eps_log2: int | None = None, seed: int = 0) -> dict[str, dict]:
    """Operations one L1BN forward and backward perform on int8 input of ``shape``.

    Runs the serial drivers with the counter on random codes and returns
    ``{"forward": {op: n}, "backward": {op: n}}`` with Table IV's op names.
    """
    rng = np.random.default_rng(seed)
    xq = rng.integers(-127, 128, size=shape, dtype=np.int8)
    n_channels = shape[1]
    gamma = QTensor(np.full(n_channels, 1 << 12, dtype=np.int32), -12)
    beta = QTensor(np.zeros(n_channels, dtype=np.int32), -12)
    eps_shift, use_eps = _eps_shift(eps_log2, -4)
    x3 = _as_ncl(xq)
    y3 = np.empty_like(x3)
    stats = np.empty((n_channels, N_STATS), dtype=np.int64)
    fwd = np.zeros(8, dtype=np.int64)
    _stats_serial(x3, eps_shift, use_eps, stats, fwd)
    _apply_serial(x3, y3, gamma.q, 8, beta.q, 8, qmax(8), stats, fwd)
    g3 = rng.integers(-127, 128, size=x3.shape, dtype=np.int8)
    bwd = np.zeros(8, dtype=np.int64)
    gstats = np.empty((n_channels, N_GSTATS), dtype=np.int64)
    _grad_stats_serial(x3, g3, gstats, bwd)
    _grad_apply_serial(x3, g3, np.empty_like(g3), stats, gstats, gamma.q, 0, qmax(8), 16,
                       np.empty(n_channels, np.int64), np.empty(n_channels, np.int64), bwd)
    return {"forward": dict(zip(OP_NAMES, map(int, fwd))),
            "backward": dict(zip(OP_NAMES, map(int, bwd)))}
