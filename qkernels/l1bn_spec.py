"""The per-channel integer math of L1BN, written once for int8 and int16 codes.

The kernels (:mod:`qkernels.l1bn`) and the slow oracle (:mod:`qkernels.oracle`) both call these
functions, so every per-channel quantity has exactly one definition; only the per-element passes
differ between them. Each function names the section of ``docs/l1bn-integer.md`` that derives
it. All are Numba ``njit`` functions on int64 scalars (no floating point).

The code width enters in one place, the flag ``centred``: int8 data use the plain affine
``saturate((A*x + B) >> sh)`` of :func:`~qkernels.fixedpoint.affine_params`; 16-bit codes (x or
dy int16), where ``u = m*x - S`` reaches 2**39, use the centred affine
``saturate((A*(x - c) + B) >> sh)`` of :func:`~qkernels.fixedpoint.affine_params_c` (section 3).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fixedpoint import (
    CENTRE_MAX,
    MOMENTUM_BITS,
    RUN_EXP,
    SLOPE_MAX_LOG2,
    affine_params,
    affine_params3,
    affine_params_c,
    bit_length,
    dy_add,
    dy_mul,
    dy_norm,
    dy_recip,
    dy_to_fixed,
    floor_div_by_recip,
    grad_p,
    round_shift,
    saturate,
    wide_dy_norm,
)

# Columns of the per-channel statistics a forward leaves for its backward.
ST_SUM, ST_DEV, ST_SIGNSUM, ST_TLO, ST_THI, ST_RMANT, ST_REXP, ST_MIN, ST_MAX, N_STATS = range(10)
# Columns of the per-channel error statistics of a backward.
GS_SUM, GS_SUMX, GS_MIN, GS_MAX, N_GSTATS = range(5)

#: Running statistics saturate at +-2**44 codes (2**20 in real units at RUN_EXP = -24), so
#: momentum_q * (new - old) <= 2**16 * 2**45 stays far inside int64.
RUN_LIMIT = np.int64(1) << np.int64(44)

#: Magnitude exponent of a zero dyadic; a range bound below _NONE_BELOW means "all zero".
_NO_MAGNITUDE = np.int64(-1 << 20)
_NONE_BELOW = -(1 << 19)


@njit(cache=True)
def mean_thresholds(s, m, inv_m_mant, inv_m_exp):
    """Section 2: thresholds of sgn(m*x - s), x <= t_lo gives -1 and x >= t_hi gives +1.
    ``t_hi - 1 = floor(s/m)``, the centre of the 16-bit forward."""
    t = floor_div_by_recip(s, m, inv_m_mant, inv_m_exp)
    t_lo = t - 1 if m * t == s else t
    return t_lo, t + 1


@njit(cache=True)
def dev_reciprocal(dev, m, eps_shift, use_eps):
    """Section 2: dyadic 1/(D + m*m*2**eps_shift), or (0, 0) for a constant channel without
    epsilon. The one division per channel."""
    dm, de = dy_norm(dev, 0)
    if use_eps:
        dm, de = dy_add(dm, de, *dy_norm(m * m, eps_shift))
    if dm == 0:
        return np.int64(0), np.int64(0)
    return dy_recip(dm, de)


@njit(cache=True)
def _slope(gamma_q, m, shift, rm, re):
    """K = gamma_q*m/D_eps * 2**shift, the slope per unit of u = m*x - S (0 when 1/D_eps is)."""
    if rm == 0:
        return np.int64(0), np.int64(0)
    return dy_mul(*dy_norm(gamma_q * m, shift), rm, re)


@njit(cache=True)
def forward_params(s, m, t, rm, re, gamma_q, gamma_shift, beta_q, beta_shift, lo, hi, centred):
    """Sections 2-3: ``(A, B, c, sh)`` of the training forward for one channel,
    y = saturate((A*(x - c) + B) >> sh).

    y = gamma_lsb * m*(m*x - S)/D_eps + beta_lsb: slope K = gamma_q*m/D_eps * 2**gamma_shift per
    unit of u = m*x - S and offset beta_q * 2**beta_shift (output LSBs). Plain (c = 0) unless
    ``centred``; then centred on c = t = floor(S/m) over the channel's codes [lo, hi].
    """
    km, ke = _slope(gamma_q, m, gamma_shift, rm, re)
    om, oe = dy_norm(beta_q, beta_shift)
    if centred:
        work = np.empty(6, dtype=np.int64)  # offset (mant, exp), centre, the affine's scratch
        work[0], work[1], work[2] = om, oe, t
        a, b, sh = affine_params_c(km, ke, m, s, work[0:1], work[1:2], work[2:3], lo, hi,
                                   work[3:])
        return a, b[0], np.int64(t), sh
    a, b, sh = affine_params(km, ke, m, s, om, oe)
    return a, b, np.int64(0), sh


@njit(cache=True)
def grad_p_dyadic(s, m, t, sg, sgx):
    """Section 4: P = m*sum(g*x) - S*sum(g) (exact, two limbs: 2**77 for int16 codes) as a
    dyadic truncated toward zero, exactly ``dy_norm(P, 0)`` whenever P fits int64."""
    return wide_dy_norm(*grad_p(s, m, t, sg, sgx), 0)


@njit(cache=True)
def backward_params(s, m, t, sign_sum, rm, re, sg, sgx, glo, ghi, gamma_q, k_shift, im, ie,
                    centred):
    """Sections 3-4: ``(A, [B_neg, B_zero, B_pos], [c_neg, c_zero, c_pos], sh)`` of equation
    (20) for one channel, dx = saturate((A*(g - c_s) + B_s) >> sh) with s = sgn(x - mu).

    dx = K*(m*g - sum g) - K*(P/D_eps)*(m*s - sum s), with K = gamma_q*m/D_eps * 2**k_shift:
    affine in g with one offset per sign. Centres are 0 unless ``centred``; then each sign's
    affine is centred on the integer nearest its root g* = (sum g - (P/D_eps)*(sum s - m*s))/m
    (``1/m ~ im * 2**ie``), over g in [glo, ghi]. B and the centres are int64 arrays.
    """
    pm, pe = grad_p_dyadic(s, m, t, sg, sgx)
    a, b, cen, sh = backward_params_p(pm, pe, m, sign_sum, rm, re, sg, glo, ghi, gamma_q,
                                      k_shift, im, ie, centred)
    return a, np.array(b), np.array(cen), sh


@njit(cache=True)
def _root(sgm, sge, prm, pre, vm, ve, im, ie):
    """The centre of one sign's centred affine: the integer nearest (sum g - (P/D_eps)*v)/m
    for v = sum s - m*s, saturated at CENTRE_MAX."""
    rtm, rte = dy_mul(*dy_add(sgm, sge, *dy_mul(-prm, pre, vm, ve)), im, ie)
    return saturate(dy_to_fixed(rtm, rte, 0), np.int64(CENTRE_MAX))


@njit(cache=True)
def backward_params_p(pm, pe, m, sign_sum, rm, re, sg, glo, ghi, gamma_q, k_shift, im, ie,
                      centred):
    """:func:`backward_params` from P's dyadic ``(pm, pe)`` (:func:`grad_p_dyadic`), for a
    caller that needs P anyway (the kernels: dgamma too), so it is computed once. B and the
    centres are 3-tuples: the kernels call this per channel, and the plain (int8) form makes
    no array at all."""
    zeros = (np.int64(0), np.int64(0), np.int64(0))
    if rm == 0:
        return np.int64(0), zeros, zeros, np.int64(1)
    prm, pre = dy_mul(pm, pe, rm, re)  # P/D_eps, |.| <= (max g - min g)/2 (+ rounding)
    km, ke = _slope(gamma_q, m, k_shift, rm, re)
    kqm, kqe = dy_mul(km, ke, prm, pre)
    # each sign's factor v = sum s - m*s, s = -1, 0, +1, and its offset K*(P/D_eps)*v
    v0m, v0e = dy_norm(sign_sum + m, 0)
    v1m, v1e = dy_norm(sign_sum, 0)
    v2m, v2e = dy_norm(sign_sum - m, 0)
    o0m, o0e = dy_mul(kqm, kqe, v0m, v0e)
    o1m, o1e = dy_mul(kqm, kqe, v1m, v1e)
    o2m, o2e = dy_mul(kqm, kqe, v2m, v2e)
    # The offsets grow with the slope: past the slope clamp, scale the whole affine down by a
    # power of two instead of clamping the slope alone. Signs and saturated outputs are kept;
    # unsaturated ones shrink by that power of two (outside the accuracy contract anyway).
    excess = max(ke + bit_length(km) - SLOPE_MAX_LOG2 if km != 0 else np.int64(0), np.int64(0))
    ke -= excess
    om = (o0m, o1m, o2m)
    oe = (o0e - excess, o1e - excess, o2e - excess)
    if centred:
        sgm, sge = dy_norm(sg, 0)
        cen = (_root(sgm, sge, prm, pre, v0m, v0e, im, ie),
               _root(sgm, sge, prm, pre, v1m, v1e, im, ie),
               _root(sgm, sge, prm, pre, v2m, v2e, im, ie))
        work = np.empty(18, dtype=np.int64)  # offsets (mants, exps), centres, the scratch
        for i in range(3):
            work[i], work[3 + i], work[6 + i] = om[i], oe[i], cen[i]
        a, b, sh = affine_params_c(km, ke, m, sg, work[0:3], work[3:6], work[6:9], glo, ghi,
                                   work[9:])
        return a, (b[0], b[1], b[2]), cen, sh
    a, b3, sh = affine_params3(km, ke, m, sg, om, oe)
    return a, b3, zeros, sh


@njit(cache=True)
def dgamma_code(m, pm, pe, rm, re, shift):
    """Section 4: round(sum(g*xhat) * 2**shift) = round(m*P/D_eps * 2**shift), from P's
    dyadic (pm, pe)."""
    if rm == 0 or pm == 0:
        return np.int64(0)
    dm, de = dy_mul(*dy_mul(pm, pe, rm, re), *dy_norm(m, 0))
    return dy_to_fixed(dm, de, shift)


@njit(cache=True)
def _magnitude_exp(vm, ve):
    """Binary exponent bound of a dyadic: |v| < 2**result."""
    return ve + bit_length(vm) if vm != 0 else _NO_MAGNITUDE


@njit(cache=True)
def output_exponent(stats, m, gamma_q, gamma_exp, beta_q, beta_exp, bits):
    """Section 8: exponent of the forward's output chosen from its range, ``E - (bits - 1)``.

    ``E`` bounds the binary exponent of the largest |gamma*xhat + beta| over all channels,
    evaluated (dyadically) at each channel's smallest and largest code: the affine is monotone,
    so its extremes are there. Like the normalization, it depends on the input's exponent only
    through epsilon. An all-zero output gets ``beta_exp``.
    """
    top = _NO_MAGNITUDE
    for c in range(stats.shape[0]):
        st = stats[c]
        km, ke = _slope(np.int64(gamma_q[c]), m, gamma_exp, st[ST_RMANT], st[ST_REXP])
        bm, be = dy_norm(np.int64(beta_q[c]), beta_exp)
        for code in (st[ST_MIN], st[ST_MAX]):
            ym, ye = dy_add(*dy_mul(km, ke, *dy_norm(m * code - st[ST_SUM], 0)), bm, be)
            top = max(top, _magnitude_exp(ym, ye))
    if top < _NONE_BELOW:
        return np.int64(beta_exp)
    return top - (bits - 1)


@njit(cache=True)
def grad_exponent(stats, gstats, m, gamma_q, k_base, bits):
    """Section 8: exponent of the backward's dx chosen from a bound of its range,
    ``E - (bits - 1)``.

    ``k_base = gamma_exp + g_exp - x_exp`` (dx's exponent is then ``k_base - k_shift``).
    Per channel dx is affine in g with an offset linear in the sign s; ``E`` bounds its binary
    exponent at the channel's smallest and largest g with s = -1 and s = +1.
    """
    top = _NO_MAGNITUDE
    for c in range(stats.shape[0]):
        st = stats[c]
        gs = gstats[c]
        if st[ST_RMANT] == 0:
            continue
        pm, pe = grad_p_dyadic(st[ST_SUM], m, st[ST_THI] - 1, gs[GS_SUM], gs[GS_SUMX])
        km, ke = _slope(np.int64(gamma_q[c]), m, k_base, st[ST_RMANT], st[ST_REXP])
        kqm, kqe = dy_mul(km, ke, *dy_mul(pm, pe, st[ST_RMANT], st[ST_REXP]))
        for gv in (gs[GS_MIN], gs[GS_MAX]):
            am, ae = dy_mul(km, ke, *dy_norm(m * gv - gs[GS_SUM], 0))
            for sgn in (-1, 1):
                om, oe = dy_mul(kqm, kqe, *dy_norm(st[ST_SIGNSUM] - m * sgn, 0))
                top = max(top, _magnitude_exp(*dy_add(am, ae, om, oe)))
    if top < _NONE_BELOW:
        return np.int64(k_base)
    return top - (bits - 1)


@njit(cache=True)
def inference_params(gamma_q, gamma_shift, beta_q, beta_shift, run_mean, run_dev, x_exp,
                     eps_shift, use_eps, wide):
    """Section 7: fold running statistics into one (A, B, sh) per channel (Algorithm 1, step 9).

    The running mean is taken to ``f`` fractional bits of the input code (as many as keep
    |x*2**f - mu| < 2**31), so y = K*(x*2**f - mu_f) + beta with K = gamma/(sigma + eps)*2**-f.
    For int8 input the plain affine. For ``wide`` (16-bit) input, f = max(0, 30 - max(16,
    b + 1)) <= 14 for |mu| < 2**b codes and the affine is the centred one centred on 0 over
    [-2**15, 2**15 - 1], so that |A|*2**15 + |B| < 2**63: exact in int64 for every int16 x.
    """
    n = gamma_q.shape[0]
    out = np.zeros((n, 3), dtype=np.int64)
    to_code = np.int64(RUN_EXP) - x_exp
    floor_mag = np.int64(16 if wide else 8)
    work = np.zeros(6, dtype=np.int64)  # 16-bit: offset (mant, exp), centre 0, the scratch
    for c in range(n):
        mum, mue = dy_norm(run_mean[c], to_code)
        mag = max(floor_mag, bit_length(mum) + mue + 1) if mum != 0 else floor_mag
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
        if wide:
            work[0], work[1] = om, oe
            a, b, sh = affine_params_c(km, ke - f, np.int64(1) << f, mu_f, work[0:1],
                                       work[1:2], work[2:3], np.int64(-(1 << 15)),
                                       np.int64((1 << 15) - 1), work[3:])
            out[c, 0], out[c, 1], out[c, 2] = a, b[0], sh
        else:
            out[c, 0], out[c, 1], out[c, 2] = affine_params(km, ke - f, np.int64(1) << f, mu_f,
                                                            om, oe)
    return out


@njit(cache=True)
def _momentum_step(old, new, momentum_q, lim):
    """old + momentum*(new - old), momentum = momentum_q / 2**MOMENTUM_BITS, saturated."""
    old = saturate(old, lim)
    delta = saturate(new, lim) - old
    return saturate(old + round_shift(momentum_q * delta, MOMENTUM_BITS), lim)


@njit(cache=True)
def running_update(run_mean, run_dev, stats, m, x_exp, momentum_q):
    """Section 7: in-place integer momentum update of the running mean and running L1
    deviation."""
    inv_m = dy_recip(*dy_norm(m, 0))
    shift = x_exp - np.int64(RUN_EXP)
    for c in range(run_mean.shape[0]):
        mean = dy_to_fixed(*dy_mul(*dy_norm(stats[c, ST_SUM], 0), *inv_m), shift)
        dm, de = dy_mul(*dy_mul(*dy_norm(stats[c, ST_DEV], 0), *inv_m), *inv_m)
        dev = dy_to_fixed(dm, de, shift)
        run_mean[c] = _momentum_step(run_mean[c], mean, momentum_q, RUN_LIMIT)
        run_dev[c] = _momentum_step(run_dev[c], dev, momentum_q, RUN_LIMIT)
