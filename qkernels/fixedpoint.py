"""The fixed-point spec: number format, rounding, saturation, dyadic scalars, reciprocal.

Everything numeric that qkernels and qtrain agree on is defined here, once.

Number format
-------------
An integer tensor is a pair ``(q, e)``: integer codes ``q`` and a per-tensor power-of-two
exponent ``e``; the value it stands for is ``q * 2**e``. A ``k``-bit code is symmetric:
``-(2**(k-1) - 1) <= q <= 2**(k-1) - 1`` (so ``-2**(k-1)`` never occurs and negation never
overflows). ``k`` is 2..16 for weights, activations, errors and gradients; codes of up to 8 bits
are stored as ``int8`` and wider ones as ``int16``.

Accumulators and stores
-----------------------
* per-element products of int8 codes: ``int32``; of int16 codes: ``int32`` products summed in
  ``int64``;
* per-channel sums and every per-channel intermediate: ``int64``, except the few that 16-bit
  codes push past it (the backward's ``P``, the centred offsets), which are exact two-limb
  integers (``wide_*`` below: ``hi * 2**32 + lo``);
* BN scale/shift (gamma, beta) codes: ``int32`` with their own exponent (the wide weight store);
* running statistics: ``int64`` codes with the fixed exponent ``RUN_EXP``.

Rounding
--------
Round-to-nearest is *round half up*: ``floor(t + 1/2)``, done on integers as
``(v + 2**(s-1)) >> s``. Stochastic rounding (``qkernels.rng``) adds a uniform integer in
``[0, 2**s)`` before the shift. Saturation clamps to the symmetric code range.

Dyadic scalars
--------------
Per-channel quantities that are not integers (a reciprocal, a slope) are *dyadic numbers*
``(mant, exp)`` with value ``mant * 2**exp`` and ``2**30 <= |mant| < 2**31`` (or ``mant == 0``).
A product of two mantissas fits in 62 bits, so multiplying is one int64 multiply and a
renormalising shift; each operation truncates (toward zero, or toward -inf when aligning a sum)
with a relative error below 2**-29 (the reciprocal: below 1.5 * 2**-30).
This is the (multiplier, shift) pair of integer-only inference, kept normalised.

All functions here are Numba ``njit`` functions on Python ints/NumPy integers: kernels inline
them, and the oracle (``qkernels.oracle``) calls the very same functions from Python, so the
per-channel arithmetic has exactly one definition.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import _i32 as _lowlevel

#: Code widths accepted for W, A, G and E.
BITS_MIN = 2
BITS_MAX = 16

#: Mantissa width of dyadic scalars: normalised mantissas satisfy 2**30 <= |mant| < 2**31.
MANT_BITS = 31
_MANT_LO = np.int64(1) << np.int64(MANT_BITS - 1)

#: Largest number of values per channel (m = N*H*W) the L1BN kernels accept, for int8 and int16
#: codes alike. For int8 codes (even -128) it keeps every exact per-channel intermediate inside
#: int64: |m*x - S| <= 255*m < 2**31, the L1 sum D <= 255*m**2 < 2**54, and the backward's
#: |sum g*(m*x - S)| <= 128*255*m**2 < 2**61. For int16 codes (even -32768) S, D <= 2**15*m**2
#: <= 2**61 and sum(g*x) <= 2**53 stay in int64, and the backward's P (up to 2**77) and its
#: centred offsets are formed with the two-limb helpers below.
M_MAX = 1 << 23

#: Exponent of running-statistics codes (value = code * 2**RUN_EXP).
RUN_EXP = -24

#: Momentum is a fixed-point fraction momentum_q / 2**MOMENTUM_BITS (torch convention:
#: new = (1 - momentum) * old + momentum * batch).
MOMENTUM_BITS = 16

#: Fractional bits of the per-channel affine (A, B, sh): SH_MIN keeps the offset's rounding below
#: 2**-9 LSB, SH_MAX keeps |B * 2**sh| inside int64 for |B| <= OFFSET_MAX.
SH_MIN = 8
SH_MAX = 40

#: Largest |offset| (beta, in output LSBs) the forward accepts; with SH_MAX it keeps every
#: per-element sum below 2**62.
OFFSET_MAX = 1 << 20

#: Slopes of 2**SLOPE_MAX_LOG2 output LSBs per unit or more are clamped just below it, which
#: keeps the fixed-point slope |Kf| <= 2**30 at SH_MIN; as 2**SLOPE_MAX_LOG2 = 2 * OFFSET_MAX,
#: with an offset below OFFSET_MAX every |u| >= 1 saturates either way. (The backward scales its offsets down with the slope, see
#: qkernels.l1bn_spec.backward_params.)
SLOPE_MAX_LOG2 = MANT_BITS - 2 - SH_MIN

#: The narrow (int32) affine form is used while |slope|*128 and |intercept| stay below
#: 2**NARROW_MAG output LSBs; it then has at least SH_NARROW = 29 - NARROW_MAG fractional bits.
NARROW_MAG = 19
SH_NARROW = 29 - NARROW_MAG

#: The centred affine form of 16-bit codes (``affine_params_c``): its wide offsets are saturated
#: at +-CENTRED_B_MAX (never reached, see the function), its centres at +-CENTRE_MAX, and the
#: kernels clamp ``x - centre`` to at most +-WINDOW_MAX (never more than the saturation needs).
CENTRED_B_MAX = 1 << 61
CENTRE_MAX = 1 << 18
WINDOW_MAX = 1 << 20
#: The centred wide form takes up to SH_MAX_C fractional bits, as many as keep every offset
#: below 2**CENTRED_B_BITS (fewer when a large offset needs it, never fewer than SH_MIN).
SH_MAX_C = 44
CENTRED_B_BITS = 61

#: Two-limb integers: value = hi * 2**WIDE_SHIFT + lo with 0 <= lo < 2**WIDE_SHIFT.
WIDE_SHIFT = 32
_WIDE_MASK = (np.int64(1) << np.int64(WIDE_SHIFT)) - np.int64(1)


@njit(cache=True)
def qmax(bits):
    """Largest code of a symmetric ``bits``-wide format: 2**(bits-1) - 1."""
    return (np.int64(1) << np.int64(bits - 1)) - np.int64(1)


@njit(cache=True)
def saturate(v, q):
    """Clamp ``v`` to ``[-q, q]``."""
    return min(max(v, -q), q)


@njit(cache=True)
def round_shift(v, s):
    """``round(v / 2**s)`` with ties up, for ``s >= 0`` and ``|v| < 2**62``."""
    if s <= 0:
        return v << np.int64(-s)
    if s > 62:
        return np.int64(0)
    return (v + (np.int64(1) << np.int64(s - 1))) >> np.int64(s)


@njit(cache=True)
def bit_length(v):
    """Number of bits of ``|v|`` (0 for 0): 64 minus the leading zeros (one instruction)."""
    return 64 - _lowlevel.clz64(abs(np.int64(v)))


@njit(cache=True)
def dy_norm(v, e):
    """Dyadic ``(mant, exp)`` for the exact integer ``v * 2**e`` (truncating toward zero)."""
    v = np.int64(v)
    if v == 0:
        return np.int64(0), np.int64(0)
    a = abs(v)
    b = bit_length(a)
    if b > MANT_BITS:
        a >>= np.int64(b - MANT_BITS)
    else:
        a <<= np.int64(MANT_BITS - b)
    exp = np.int64(e) + b - MANT_BITS
    return (a if v > 0 else -a), exp


@njit(cache=True)
def dy_mul(am, ae, bm, be):
    """Product of two dyadic numbers."""
    return dy_norm(am * bm, ae + be)


@njit(cache=True)
def dy_add(am, ae, bm, be):
    """Sum of two dyadic numbers (the smaller is aligned to the larger, truncating)."""
    if am == 0:
        return bm, be
    if bm == 0:
        return am, ae
    if ae < be:
        am, ae, bm, be = bm, be, am, ae
    d = ae - be
    bm = bm >> np.int64(d) if d < 63 else np.int64(0)
    return dy_norm(am + bm, ae)


@njit(cache=True)
def dy_recip(dm, de):
    """Reciprocal of a positive dyadic number: ``2**62 // mant``, the one division per channel."""
    r = (np.int64(1) << np.int64(62)) // dm
    return dy_norm(r, -np.int64(62) - de)


@njit(cache=True)
def dy_to_fixed(m, e, sh):
    """``round(m * 2**(e + sh))`` as an int64, saturated to ``+-2**62``."""
    if m != 0 and e + sh + bit_length(m) > 62:
        return np.int64(1 << 62) if m > 0 else -np.int64(1 << 62)
    return round_shift(m, -(e + sh))


@njit(cache=True)
def _narrow_shift(mag):
    """The narrow form's ``sh = min(29 - mag, 30)`` for terms below ``2**mag``, and its rounding
    half ``2**(sh-1)``, folded into ``B``."""
    sh = min(np.int64(29) - mag, np.int64(30))
    return sh, np.int64(1) << np.int64(sh - 1)


@njit(cache=True)
def _narrow_affine(am, ae, cm, ce, mag, b):
    """The narrow form: ``(A, B, sh)`` from the per-code slope ``am*2**ae`` and intercepts
    ``cm[j]*2**ce[j]`` all below ``2**mag`` (written into ``b``)."""
    sh, half = _narrow_shift(mag)
    for j in range(cm.shape[0]):
        b[j] = dy_to_fixed(cm[j], ce[j], sh) + half
    return dy_to_fixed(am, ae, sh), b, sh


@njit(cache=True)
def _clamp_slope(km, ke):
    """Slopes of ``2**SLOPE_MAX_LOG2`` or more, clamped just below it (``= 2 * OFFSET_MAX``:
    every ``|u| >= 1`` still saturates)."""
    if km != 0 and ke + bit_length(km) - 1 >= SLOPE_MAX_LOG2:
        km = np.int64((1 << 31) - 1) if km > 0 else -np.int64((1 << 31) - 1)
        ke = np.int64(SLOPE_MAX_LOG2 - 31)
    return km, ke


@njit(cache=True)
def _affine_slope(km, ke, a1, b1):
    """``K*a1`` and ``K*b1`` as dyadics, and the narrow form's bound on ``|K*a1|*128``: the
    exponent ``mag`` with ``|K*a1|*128 < 2**mag``."""
    am, ae = dy_mul(km, ke, *dy_norm(a1, 0))
    pm, pe = dy_mul(km, ke, *dy_norm(b1, 0))
    mag = ae + bit_length(am) + 7 if am != 0 else np.int64(-64)
    return am, ae, pm, pe, mag


@njit(cache=True)
def _intercept(om, oe, pm, pe, mag):
    """The intercept ``O - K*b1`` as a dyadic, and ``mag`` raised to bound it too."""
    cm, ce = dy_add(om, oe, -pm, pe)
    if cm != 0:
        mag = max(mag, ce + bit_length(cm))
    return cm, ce, mag


@njit(cache=True)
def _wide_slope(km, ke):
    """The wide form's clamped fixed-point slope ``Kf``, its ``sh`` and rounding half."""
    km, ke = _clamp_slope(km, ke)
    sh = min(max(-ke - 1, SH_MIN), SH_MAX) if km != 0 else np.int64(SH_MIN)
    return dy_to_fixed(km, ke, sh), np.int64(sh), np.int64(1) << np.int64(sh - 1)


@njit(cache=True)
def _wide_offset(om, oe, kf, b1, sh, rounding):
    """The wide form's ``B = round(O*2**sh) - Kf*b1 + rounding`` (``rounding = 2**(sh-1)``):
    with ``|Kf*u| < 2**30 * 2**31`` and the offset saturated at ``2**61``, ``|A*x + B| < 2**62
    + 2**61 + 2**60``."""
    of = saturate(dy_to_fixed(om, oe, sh) if om != 0 else np.int64(0),
                  np.int64(1) << np.int64(61))
    return of - kf * b1 + rounding


@njit(cache=True)
def affine_params(km, ke, a1, b1, om, oe):
    """Integer affine ``y = saturate((A*x + B) >> sh, q)`` for ``y = K*(a1*x - b1) + O``.

    ``K = km * 2**ke`` is the slope in output LSBs per unit of ``u = a1*x - b1`` (exact integers,
    ``|u| < 2**31`` for every int8 ``x``), ``O = om * 2**oe`` the offset in output LSBs. The
    rounding half is folded into ``B``, so applying it is a multiply, an add, a shift and a
    clamp. Two forms, chosen by magnitude:

    * narrow (when ``|K*a1|*128`` and ``|O - K*b1|`` are below ``2**NARROW_MAG``): slope per
      code ``A = round(K*a1 * 2**sh)`` and intercept ``B = round((O - K*b1)*2**sh)`` with
      ``SH_NARROW <= sh <= 30`` chosen so that ``|A|*128 + |B| < 2**31``: the kernels evaluate
      it in int32 lanes. Rounding ``A`` costs at most ``64.5 / 2**sh`` LSB.
    * wide (otherwise): exactly centred, ``A*x + B = Kf*u + round(O*2**sh) + 2**(sh-1)`` with
      ``Kf = round(K * 2**sh) <= 2**30`` and ``SH_MIN <= sh <= SH_MAX``, evaluated in int64, so
      a large slope on a near-constant channel loses nothing to cancellation. Slopes above
      ``2**SLOPE_MAX_LOG2`` are clamped there (every ``|u| >= 1`` saturates either way).

    Scalars in and out: a per-channel loop then creates no array views, whose reference
    counting (atomic increments and decrements) cost more than this arithmetic. Returns
    ``(A, B, sh)``.
    """
    am, ae, pm, pe, mag = _affine_slope(km, ke, a1, b1)
    cm, ce, mag = _intercept(om, oe, pm, pe, mag)
    if mag <= NARROW_MAG:
        sh, half = _narrow_shift(mag)
        return dy_to_fixed(am, ae, sh), dy_to_fixed(cm, ce, sh) + half, sh
    kf, sh, half = _wide_slope(km, ke)
    return kf * a1, _wide_offset(om, oe, kf, b1, sh, half), sh


@njit(cache=True)
def affine_params3(km, ke, a1, b1, om, oe):
    """:func:`affine_params` for three offsets sharing the slope (the backward's, one per sign):
    ``om``, ``oe`` and the returned ``B`` are 3-tuples. One form for all three: narrow when
    the slope and every intercept fit it."""
    am, ae, pm, pe, mag = _affine_slope(km, ke, a1, b1)
    c0m, c0e, mag = _intercept(om[0], oe[0], pm, pe, mag)
    c1m, c1e, mag = _intercept(om[1], oe[1], pm, pe, mag)
    c2m, c2e, mag = _intercept(om[2], oe[2], pm, pe, mag)
    if mag <= NARROW_MAG:
        sh, half = _narrow_shift(mag)
        return dy_to_fixed(am, ae, sh), (dy_to_fixed(c0m, c0e, sh) + half,
                                         dy_to_fixed(c1m, c1e, sh) + half,
                                         dy_to_fixed(c2m, c2e, sh) + half), sh
    kf, sh, half = _wide_slope(km, ke)
    return kf * a1, (_wide_offset(om[0], oe[0], kf, b1, sh, half),
                     _wide_offset(om[1], oe[1], kf, b1, sh, half),
                     _wide_offset(om[2], oe[2], kf, b1, sh, half)), sh


@njit(cache=True)
def fits_int32(a, b_abs_max, sh, x_abs_max=128):
    """True when ``(a*x + b) >> sh`` stays inside int32 for every ``|x| <= x_abs_max`` (128: any
    int8 code) and every ``|b| <= b_abs_max``."""
    return sh <= 30 and abs(a) * x_abs_max + b_abs_max < (np.int64(1) << np.int64(31))


@njit(cache=True)
def floor_div_by_recip(s, m, rm, re):
    """``floor(s / m)`` for ``m > 0`` without a division, from ``1/m ~ rm * 2**re``.

    The estimate ``s * (1/m)`` is within one of the answer; one multiply-and-compare each way
    corrects it.
    """
    qm, qe = dy_mul(*dy_norm(s, 0), rm, re)
    t = round_shift(qm, -qe) if qe < 0 else qm << qe
    while m * t > s:
        t -= 1
    while m * (t + 1) <= s:
        t += 1
    return t


# ---------------------------------------------------------------------------------------------
# Two-limb integers: the few per-channel intermediates of 16-bit codes that exceed int64 (the
# backward's P, up to 2**77, and the centred offsets before they cancel). A value is a pair
# (hi, lo) of int64 with value = hi * 2**32 + lo and 0 <= lo < 2**32; every helper keeps
# |hi| < 2**61, so each step is plain int64 arithmetic that cannot overflow. Per channel only.


@njit(cache=True)
def wide_from(v):
    """Two limbs of the int64 ``v``."""
    v = np.int64(v)
    return v >> np.int64(WIDE_SHIFT), v & _WIDE_MASK


@njit(cache=True)
def wide_add(ah, al, bh, bl):
    """Sum of two two-limb integers, normalised (the low limbs add below 2**33)."""
    lo = al + bl
    return ah + bh + (lo >> np.int64(WIDE_SHIFT)), lo & _WIDE_MASK


@njit(cache=True)
def wide_neg(h, lo):
    """Negation of a two-limb integer."""
    if lo == 0:
        return -h, np.int64(0)
    return -h - np.int64(1), (np.int64(1) << np.int64(WIDE_SHIFT)) - lo


@njit(cache=True)
def wide_bit_length(h, lo):
    """Bit length of the magnitude of a two-limb integer."""
    if h < 0:
        h, lo = wide_neg(h, lo)
    if h == 0:
        return bit_length(lo)
    return bit_length(h) + np.int64(WIDE_SHIFT)


@njit(cache=True)
def wide_mul(a, b):
    """Exact ``a * b`` for an int64 ``a`` and ``|b| <= 2**31``, as two limbs.

    With ``a = ah*2**32 + al`` (``0 <= al < 2**32``, ``|ah| <= 2**31``): ``|al*b| < 2**63`` and
    ``|ah*b| <= 2**62``.
    """
    a = np.int64(a)
    b = np.int64(b)
    ah, al = wide_from(a)
    return wide_add(ah * b, np.int64(0), *wide_from(al * b))


@njit(cache=True)
def wide_shl(v, s):
    """``v * 2**s`` as two limbs, for ``|v| < 2**31``, ``s >= 0`` and
    ``bit_length(v) + s <= 92``."""
    v = np.int64(v)
    s = np.int64(s)
    if s < WIDE_SHIFT:
        return wide_from(v << s)
    return v << (s - np.int64(WIDE_SHIFT)), np.int64(0)


@njit(cache=True)
def wide_to_fixed(m, e, sh):
    """``round(m * 2**(e + sh))`` (half up) as two limbs, for a dyadic mantissa ``|m| < 2**31``;
    magnitudes of ``2**92`` and more saturate to ``+-2**92``."""
    s = np.int64(e + sh)
    if s <= 0:
        return wide_from(round_shift(np.int64(m), -s))
    if m != 0 and s + bit_length(m) > 92:
        top = np.int64(1) << np.int64(60)
        return (top if m > 0 else -top), np.int64(0)
    return wide_shl(m, s)


@njit(cache=True)
def wide_sat(h, lo, lim):
    """The two-limb value saturated to ``[-lim, lim]``, as an int64 (``0 <= lim <= 2**62``)."""
    if h >= (np.int64(1) << np.int64(30)):
        return np.int64(lim)
    if h < -(np.int64(1) << np.int64(30)):
        return -np.int64(lim)
    return saturate((h << np.int64(WIDE_SHIFT)) + lo, np.int64(lim))


@njit(cache=True)
def wide_dy_norm(h, lo, e):
    """Dyadic ``(mant, exp)`` of the two-limb integer times ``2**e``, truncated toward zero
    exactly like :func:`dy_norm` of the same (wider) integer."""
    if -(np.int64(1) << np.int64(30)) <= h < (np.int64(1) << np.int64(30)):
        return dy_norm((h << np.int64(WIDE_SHIFT)) + lo, e)
    neg = h < 0
    if neg:
        h, lo = wide_neg(h, lo)
    b = bit_length(h)  # >= 31: the value has b + 32 bits; its top 31 are the top 31 of h
    mant = h >> (b - np.int64(31))
    return (-mant if neg else mant), np.int64(e) + b + np.int64(1)


@njit(cache=True)
def grad_p(s, m, t, sg, sgx):
    """``P = m*sum(g*x) - S*sum(g)`` exactly, as two limbs (it reaches 2**77 for int16 codes).

    With ``t = floor(S/m)`` and ``r = S - m*t`` in ``[0, m)``:
    ``P = m*(sum(g*x) - t*sum(g)) - r*sum(g)``. For ``m <= M_MAX`` and codes ``|x|, |g| <= 2**15``:
    ``|t*sum(g)| <= 2**53``, ``|sum(g*x) - t*sum(g)| <= 2**54`` (int64), the product with
    ``m < 2**31`` is :func:`wide_mul`, and ``|r*sum(g)| < 2**61``.
    """
    r = s - m * t
    h, lo = wide_mul(sgx - t * sg, m)
    return wide_add(h, lo, *wide_from(-(r * sg)))


@njit(cache=True)
def affine_params_c(km, ke, a1, b1, om, oe, cen, lo, hi, work):
    """Centred integer affines ``y = saturate((A*(x - cen[j]) + B[j]) >> sh, q)`` for
    ``y = K*(a1*x - b1) + O[j]`` over codes ``lo <= x <= hi`` (the form of 16-bit codes;
    derivation and bounds in docs/l1bn-integer.md, section 3).

    ``K``, ``O[j]`` as in :func:`affine_params`; ``cen[j]`` is an integer centre per offset,
    chosen by the caller near where that affine crosses zero (the forward: ``floor(S/m)``; the
    backward: its per-sign roots), ``|cen| <= CENTRE_MAX``. With ``dlog`` the bit length of the
    largest ``|x - cen[j]|``:

    * narrow when ``|K*a1| * 2**dlog`` and the intercepts ``|O[j] + K*(a1*cen[j] - b1)|`` are
      below ``2**mag``, ``mag <= min(NARROW_MAG, 26 - dlog)``: ``sh = min(29 - mag, 30)`` and
      ``|A*(x - c)| + |B| < 2**31`` (int32 lanes; rounding A costs at most 1/16 LSB);
    * wide otherwise: ``A = Kf*a1``, ``B[j] = Kf*(a1*cen[j] - b1) + round(O[j]*2**sh) +
      2**(sh-1)`` formed exactly in two limbs (so exactly centred on the integer ``u``), with the
      slope clamp, ``sh = clamp(-ke - 1, SH_MIN, SH_MAX_C)`` lowered while some
      ``|B[j]| >= 2**CENTRED_B_BITS``; every ``|B[j]| < 2**61``, so the saturation at
      ``+-CENTRED_B_MAX`` is never reached.

    ``om``, ``oe``, ``cen``: int64 arrays (one entry per affine); ``work``: int64 scratch of at
    least ``3*len(om)``. Returns ``(A, B, sh)`` with ``B`` the int64 array ``work[:len(om)]``;
    evaluating it needs no more than int64 once ``x - cen[j]`` is clamped to the window of
    :func:`centred_lanes`.
    """
    n = om.shape[0]
    b, cm, ce = work[:n], work[n:2 * n], work[2 * n:3 * n]
    am, ae = dy_mul(km, ke, *dy_norm(a1, 0))
    mag = np.int64(-64)
    dlog = np.int64(0)
    for j in range(n):
        pm, pe = dy_mul(km, ke, *dy_norm(a1 * cen[j] - b1, 0))
        cm[j], ce[j] = dy_add(om[j], oe[j], pm, pe)
        if cm[j] != 0:
            mag = max(mag, ce[j] + bit_length(cm[j]))
        dlog = max(dlog, bit_length(max(abs(lo - cen[j]), abs(hi - cen[j]))))
    if am != 0:
        mag = max(mag, ae + bit_length(am) + dlog)
    if mag <= min(np.int64(NARROW_MAG), np.int64(26) - dlog):
        return _narrow_affine(am, ae, cm, ce, mag, b)
    km, ke = _clamp_slope(km, ke)
    sh = min(max(-ke - 1, SH_MIN), SH_MAX_C) if km != 0 else np.int64(SH_MIN)
    while True:
        kf = dy_to_fixed(km, ke, sh)
        half = np.int64(1) << np.int64(sh - 1)
        top = np.int64(0)
        for j in range(n):
            h, lw = wide_mul(a1 * cen[j] - b1, kf)
            h, lw = wide_add(h, lw, *wide_to_fixed(om[j], oe[j], sh))
            h, lw = wide_add(h, lw, *wide_from(half))
            top = max(top, wide_bit_length(h, lw))
            b[j] = wide_sat(h, lw, CENTRED_B_MAX)
        if top <= CENTRED_B_BITS or sh == SH_MIN:
            break
        sh = max(sh - (top - CENTRED_B_BITS), np.int64(SH_MIN))
    return kf * a1, b, np.int64(sh)


@njit(cache=True)
def centred_lanes(a, b_abs_max, d_abs_max, sh, q):
    """How a kernel evaluates ``saturate((a*d + b) >> sh, q)`` for ``|d| <= d_abs_max`` and
    ``|b| <= b_abs_max``: returns ``(int32_lanes, window)``.

    ``int32_lanes`` when ``sh <= 30`` and ``|a|*d_abs_max + b_abs_max < 2**31``. Otherwise int64
    with ``d`` clamped to ``[-window, window]``: ``window`` is the smallest power of two with
    ``|a|*window >= L = b_abs_max + (q+1)*2**sh`` (capped at ``WINDOW_MAX``, 0 when ``a == 0``).
    Every ``|d| >= window`` then gives ``|a*d + b| >= (q+1)*2**sh`` with the sign of ``a*d``,
    so it saturates to the same code as the clamped ``d``: the clamp changes no result. And
    ``|a*window| < 2L`` (or ``= |a|`` for window 1), so with ``b_abs_max < 2**61``,
    ``q < 2**15`` and ``sh <= 44`` every ``|a*d + b| < 2*(2**61 + 2**59) + 2**61 < 2**63``.
    """
    wide = bit_length(a) + bit_length(d_abs_max) > 32
    lanes32 = (sh <= 30 and not wide
               and abs(a) * d_abs_max + b_abs_max < (np.int64(1) << np.int64(31)))
    if a == 0:
        return lanes32, np.int64(0)
    lim = b_abs_max + ((np.int64(q) + np.int64(1)) << np.int64(sh))
    aa = abs(np.int64(a))
    w = max(np.int64(0), bit_length(lim) - bit_length(aa))
    if (aa << w) < lim:
        w += 1
    return lanes32, min(np.int64(1) << w, np.int64(WINDOW_MAX))
