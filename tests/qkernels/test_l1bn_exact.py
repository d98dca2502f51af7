"""Every per-channel L1BN function (int8 and 16-bit codes) against exact rational arithmetic.

The kernels and the numpy oracle share these functions (``qkernels.fixedpoint`` and the
``*_params``/``*_exponent``/``*_code`` functions of ``qkernels.l1bn_spec``, one of each for both
widths: ``centred=True`` selects the 16-bit form), so kernel == oracle cannot
see a fault in them. Here each result is compared with the exact value of what it stands for
(``qkernels.exact``: Python integers and ``Fraction``) and must lie within its documented bound
(``docs/l1bn-integer.md``, cited per check) and be rounded in the documented direction: truncated
toward zero where the docs say so, unbiased (round half up) where they say that. Each check is
also run on biased variants of the real function (floor for round half up, a rounding constant
one bit off, a truncated mantissa, an exponent off by one) and must flag every one of them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkernels import exact
from qkernels.exact import EPS0, HALF, pow2
from qkernels.fixedpoint import (
    M_MAX,
    MANT_BITS,
    MOMENTUM_BITS,
    RUN_EXP,
    affine_params,
    affine_params3,
    dy_add,
    dy_mul,
    dy_norm,
    dy_recip,
    dy_to_fixed,
    floor_div_by_recip,
    round_shift,
)
from qkernels.l1bn_spec import (
    GS_MAX,
    GS_MIN,
    GS_SUM,
    GS_SUMX,
    N_GSTATS,
    N_STATS,
    RUN_LIMIT,
    ST_DEV,
    ST_MAX,
    ST_MIN,
    ST_REXP,
    ST_RMANT,
    ST_SIGNSUM,
    ST_SUM,
    ST_THI,
    ST_TLO,
    backward_params,
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

INV_CACHE: dict[int, tuple[int, int]] = {}


def inv_m(m: int) -> tuple[int, int]:
    """The kernels' dyadic 1/m (one DIV per call)."""
    if m not in INV_CACHE:
        INV_CACHE[m] = tuple(int(v) for v in dy_recip(*dy_norm(m, 0)))
    return INV_CACHE[m]


def value(mant, exp) -> Fraction:
    return exact.dyadic(int(mant), int(exp))


def normalised(mant) -> bool:
    return mant == 0 or 2 ** (MANT_BITS - 1) <= abs(int(mant)) < 2**MANT_BITS


# --- cases: channels of codes with their parameters ----------------------------------------------


def channel_codes(rng, wide: bool) -> np.ndarray:
    """One channel's codes: uniform at several widths, near-constant, two-level, skewed to the
    limit, constant, with an integer mean, -128/-32768 included; m from 2 to 2**16."""
    top = 32767 if wide else 127
    m = int(rng.choice([2, 3, 5, 16, 100, 777, 4096, 1 << 16]))
    kind = int(rng.integers(0, 7))
    q = int(rng.choice([1, 7, top] if not wide else [255, 4095, top]))
    x = rng.integers(-q, q + 1, m)
    if kind == 1:  # near-constant, anywhere in the range
        x[:] = rng.integers(-top, top)
        x[rng.integers(0, m)] += 1
    elif kind == 2:  # two levels
        x = np.where(rng.random(m) < 0.3, rng.integers(-top, top + 1), rng.integers(-top, top + 1))
    elif kind == 3:  # skewed to the limit, one code at the other end
        x[:] = top
        x[0] = -top - 1
    elif kind == 4:  # constant
        x[:] = rng.integers(-top, top + 1)
    elif kind == 5:  # an integer mean: mirrored codes around a centre
        c = int(rng.integers(-top // 2, top // 2))
        h = rng.integers(0, top // 2, m // 2)
        x[: m // 2], x[m // 2: 2 * (m // 2)] = c + h, c - h
        x[2 * (m // 2):] = c
    return x.astype(np.int16 if wide else np.int8)


def forward_cases(wide: bool, n: int = 40, seed: int = 0):
    """(codes, Channel, eps_shift, gamma_q, gamma_shift, beta_q, beta_shift) per channel."""
    rng = np.random.default_rng(seed + 1000 * wide)
    cases = []
    for _ in range(n):
        x = channel_codes(rng, wide)
        ch = exact.Channel.of(x)
        eps_shift = None if rng.random() < 0.5 else int(rng.integers(-24, 3))
        gamma_q = int(rng.choice([0, 1, 3000, -5000, 70000, 2**31 - 1, -(2**31 - 1)]))
        gamma_q = gamma_q if rng.random() < 0.5 else int(rng.integers(-(2**20), 2**20))
        gamma_shift = int(rng.integers(-30, 0))
        beta_q = int(rng.integers(-(2**14), 2**14))
        beta_shift = int(rng.integers(-14, 5))
        cases.append((x, ch, eps_shift, gamma_q, gamma_shift, beta_q, beta_shift))
    return cases


def grad_codes(rng, x: np.ndarray, ch: exact.Channel, wide: bool) -> np.ndarray:
    """Error codes for a channel: uniform, sign-aligned (g ~ c * sgn(x - mu)), nearly constant
    with a large mean, or constant."""
    top = 32767 if wide else 127
    m = x.size
    kind = int(rng.integers(0, 4))
    if kind == 0:
        g = rng.integers(-top, top + 1, m)
    elif kind == 1:
        s = np.sign(m * x.astype(np.int64) - ch.s)
        g = s * int(rng.integers(1, top)) + rng.integers(-2, 3, m)
    elif kind == 2:
        g = int(rng.integers(-top + 2, top - 2)) + rng.integers(0, 2, m)
    else:
        g = np.full(m, int(rng.integers(-top, top + 1)))
    return np.clip(g, -top - 1, top).astype(np.int16 if wide else np.int8)


def backward_cases(wide: bool, n: int = 40, seed: int = 0):
    """Forward cases with error codes and a k_shift (dx exponent) per channel."""
    rng = np.random.default_rng(seed + 7 + 1000 * wide)
    out = []
    for x, ch, eps_shift, gamma_q, _, _, _ in forward_cases(wide, n, seed):
        g = grad_codes(rng, x, ch, wide)
        gc = exact.GradChannel.of(ch, x, g)
        out.append((x, g, ch, gc, eps_shift, gamma_q, int(rng.integers(-24, 8))))
    return out


def reciprocal(ch: exact.Channel, eps_shift) -> tuple[int, int]:
    rm, re = dev_reciprocal(ch.dev, ch.m, 0 if eps_shift is None else eps_shift,
                            eps_shift is not None)
    return int(rm), int(re)


def some_codes(lo: int, hi: int, rng, extra=()) -> list[int]:
    """Every code in [lo, hi] when there are few, else the ends, ``extra`` and 300 samples."""
    if hi - lo <= 600:
        return list(range(lo, hi + 1))
    picks = set(rng.integers(lo, hi + 1, 300).tolist()) | {lo, hi} | set(extra)
    return sorted(v for v in picks if lo <= v <= hi)


class Errors:
    """Signed errors (kernel value - exact) in LSBs, for the bias statistic."""

    def __init__(self):
        self.values: list[float] = []
        self.largest = 0.0
        self.count = 0

    def add(self, err: Fraction, bound: Fraction, what: str, record: bool = True):
        """Check |err| <= bound; ``record`` it for the bias statistic (leave out values whose
        bound is dominated by a relative truncation toward zero, which is biased by design)."""
        assert abs(err) <= bound, f"{what}: |{float(err):.4g}| > {float(bound):.4g}"
        self.largest = max(self.largest, abs(float(err)))
        self.count += 1
        if record:
            self.values.append(float(err))

    def unbiased(self, limit: float, what: str, min_count: int = 200, bias: bool = True):
        """Round half up is unbiased: the mean error over many values is near 0 (a floor, or a
        rounding constant one bit off, moves it by about 1/2). Prints the largest |error|
        (``pytest -s`` shows it: the figures docs/l1bn-integer.md section 5 quotes)."""
        print(f"{what}: {self.count} values, largest |E| {self.largest:.3g} LSB")
        if not bias:  # a few large channels: the bounds hold, too few values for a mean
            return
        assert len(self.values) >= min_count, f"{what}: only {len(self.values)} values checked"
        mean = float(np.mean(self.values))
        assert abs(mean) < limit, f"{what}: mean error {mean:.4f} LSB (biased)"


# --- fixed-point primitives (docs section 1) ----------------------------------------------------

INT62 = st.integers(-(2**62) + 1, 2**62 - 1)
MANT = st.integers(2**30, 2**31 - 1).flatmap(lambda v: st.sampled_from([v, -v]))
EXP = st.integers(-200, 200)


def check_truncated(mant, exp, want: Fraction):
    """(mant, exp) is ``want`` truncated toward zero to a normalised 31-bit mantissa."""
    assert normalised(mant)
    got = value(mant, exp)
    if want == 0:
        assert mant == 0
        return
    assert exact.sign(got) == exact.sign(want) and abs(got) <= abs(want)
    assert abs(want) - abs(got) < pow2(exp), "not the truncation to 31 bits"
    assert abs(want - got) < EPS0 * abs(want)


@settings(max_examples=300, deadline=None)
@given(v=INT62, e=EXP)
def test_dy_norm_truncates_toward_zero(v, e):
    """dy_norm(v, e): v*2**e truncated toward zero to 31 bits (exact below 2**31)."""
    mant, exp = dy_norm(v, e)
    check_truncated(mant, exp, v * pow2(e))
    if abs(v) < 2**31:
        assert value(mant, exp) == v * pow2(e)


@settings(max_examples=300, deadline=None)
@given(am=MANT, ae=EXP, bm=MANT, be=EXP)
def test_dy_mul_truncates_the_exact_product(am, ae, bm, be):
    """dy_mul: the exact product truncated toward zero (relative error < 2**-30)."""
    check_truncated(*dy_mul(am, ae, bm, be), value(am, ae) * value(bm, be))


@settings(max_examples=300, deadline=None)
@given(am=MANT, ae=EXP, bm=MANT, d=st.integers(-70, 70))
def test_dy_add_within_two_units(am, ae, bm, d):
    """dy_add: within 2*eps0 of the larger magnitude (floor alignment, then truncation)."""
    mant, exp = dy_add(am, ae, bm, ae + d)
    want = value(am, ae) + value(bm, ae + d)
    assert normalised(mant)
    big = max(abs(value(am, ae)), abs(value(bm, ae + d)))
    assert abs(value(mant, exp) - want) < 2 * EPS0 * big


@settings(max_examples=300, deadline=None)
@given(dm=st.integers(2**30, 2**31 - 1), de=EXP)
def test_dy_recip_from_below_within_one_and_a_half_units(dm, de):
    """dy_recip: 1/d truncated (never above), relative error < 1.5 * 2**-30."""
    mant, exp = dy_recip(dm, de)
    want = 1 / value(dm, de)
    got = value(mant, exp)
    assert normalised(mant) and 0 < got <= want
    assert want - got < Fraction(3, 2) * EPS0 * want


@settings(max_examples=300, deadline=None)
@given(m=MANT, e=st.integers(-80, 40), sh=st.integers(0, 62))
def test_dy_to_fixed_rounds_half_up(m, e, sh):
    """dy_to_fixed: round half up of m*2**(e+sh), saturated at +-2**62."""
    want = exact.round_half_up(value(m, e + sh))
    assert dy_to_fixed(m, e, sh) == max(-(2**62), min(2**62, want))


@settings(max_examples=300, deadline=None)
@given(v=INT62, s=st.integers(0, 70))
def test_round_shift_rounds_half_up(v, s):
    """round_shift(v, s) = floor(v/2**s + 1/2)."""
    assert round_shift(v, s) == exact.round_half_up(Fraction(v, 2**s))


@settings(max_examples=300, deadline=None)
@given(s=st.integers(-(2**38), 2**38), m=st.integers(1, 2**23))
def test_floor_div_by_recip_is_exact(s, m):
    """floor_div_by_recip: exactly floor(s/m), from the dyadic 1/m."""
    assert floor_div_by_recip(s, m, *inv_m(m)) == s // m


@settings(max_examples=300, deadline=None)
@given(km=MANT, ke=st.integers(-70, 0), a1=st.integers(1, 2**23), u=st.integers(-128, 128),
       offsets=st.lists(st.tuples(st.one_of(st.just(0), MANT), st.integers(-60, 30)),
                        min_size=3, max_size=3))
def test_affine_params3_is_three_affine_params_sharing_one_form(km, ke, a1, u, offsets):
    """affine_params3 (the backward's three offsets) gives each offset the B that
    affine_params gives it alone whenever the three single calls choose the same shift; else
    its one form is that of the offset that needs the most room (the widest intercept, or a
    wide form), so that offset's single call equals it."""
    b1 = u * a1  # S = m * mean, |mean| <= 128
    om = tuple(np.int64(m) for m, _ in offsets)
    oe = tuple(np.int64(e) for _, e in offsets)
    a, b3, sh = affine_params3(km, ke, a1, b1, om, oe)
    singles = [affine_params(km, ke, a1, b1, om[j], oe[j]) for j in range(3)]
    if len({int(s[2]) for s in singles}) == 1:
        assert int(sh) == int(singles[0][2]) and int(a) == int(singles[0][0])
        assert [int(b) for b in b3] == [int(s[1]) for s in singles]
    assert any((int(s[0]), int(s[1]), int(s[2])) == (int(a), int(b3[j]), int(sh))
               for j, s in enumerate(singles))


# --- statistics: thresholds and the reciprocal (section 2) ---------------------------------------


def check_mean_thresholds(cases, fn=mean_thresholds):
    """t_lo, t_hi give sgn(m x - S) for every code: t_hi = floor(S/m) + 1, t_lo the largest
    code strictly below the mean."""
    for x, ch, *_ in cases:
        t_lo, t_hi = (int(v) for v in fn(ch.s, ch.m, *inv_m(ch.m)))
        assert t_hi == ch.s // ch.m + 1
        assert t_lo == -((-ch.s) // ch.m) - 1
        for v in range(t_lo - 2, t_hi + 3):
            assert (v >= t_hi) - (v <= t_lo) == ch.sgn(v)


def check_dev_reciprocal(cases, fn=dev_reciprocal):
    """1/D_eps within 5.5 eps0 with epsilon, 2.5 eps0 without (section 5); (0, 0) for a
    constant channel without epsilon."""
    for _, ch, eps_shift, *_ in cases:
        rm, re = fn(ch.dev, ch.m, 0 if eps_shift is None else eps_shift, eps_shift is not None)
        den = ch.d_eps(eps_shift)
        if den == 0:
            assert (rm, re) == (0, 0)
            continue
        assert normalised(rm)
        bound = Fraction(5.5) if eps_shift is not None else Fraction(2.5)
        assert abs(value(rm, re) * den - 1) < bound * EPS0


@pytest.mark.parametrize("wide", [False, True])
def test_mean_thresholds_exact(wide):
    cases = forward_cases(wide)
    assert any(ch.s % ch.m == 0 and ch.dev for _, ch, *_ in cases), "no integer-mean channel"
    check_mean_thresholds(cases)


@pytest.mark.parametrize("wide", [False, True])
def test_dev_reciprocal_within_bound(wide):
    check_dev_reciprocal(forward_cases(wide))


# --- forward parameters (sections 2, 3 and 5) ---------------------------------------------------


def check_forward_params(cases, fn=forward_params, bias=True):
    """int8 (plain form, c = 0): (A x + B)/2**sh - 1/2 within 0.073 LSB of the exact y for every
    code with |K u| <= 2**21 (section 5); beyond, the sign is right and the value saturates at
    any width."""
    errs = Errors()
    for _, ch, eps_shift, gq, gs, bq, bs in cases:
        rm, re = reciprocal(ch, eps_shift)
        a, b, c, sh = (int(v) for v in fn(ch.s, ch.m, ch.s // ch.m, rm, re, gq, gs, bq, bs,
                                          -128, 127, False))
        assert c == 0
        k = exact.forward_slope(ch, gq, gs, eps_shift)
        for v in range(-128, 128):
            y = exact.forward_value(ch, v, gq, gs, bq, bs, eps_shift)
            got = Fraction(a * v + b, 2**sh) - HALF
            if abs(k * (ch.m * v - ch.s)) <= 2**21:
                errs.add(got - y, exact.FORWARD8, f"forward_params at x={v}")
            else:
                assert exact.sign(got) == exact.sign(y) and abs(got) > 2**15
    errs.unbiased(0.01, "forward_params", bias=bias)


def check_forward_params_centred(cases, fn=forward_params, bias=True):
    """16-bit (centred form): (A (x - c) + B)/2**sh - 1/2 within section 5's 16-bit bound of
    the exact y, over the channel's range [lo, hi], for every output that does not saturate at
    16 bits."""
    errs = Errors()
    rng = np.random.default_rng(1)
    for x, ch, eps_shift, gq, gs, bq, bs in cases:
        rm, re = reciprocal(ch, eps_shift)
        lo, hi = min(ch.values), max(ch.values)
        a, b, c, sh = (int(v) for v in fn(ch.s, ch.m, ch.s // ch.m, rm, re, gq, gs, bq, bs,
                                          lo, hi, True))
        k = exact.forward_slope(ch, gq, gs, eps_shift)
        for v in some_codes(lo, hi, rng, ch.values[:50]):
            y = exact.forward_value(ch, v, gq, gs, bq, bs, eps_shift)
            got = Fraction(a * (v - c) + b, 2**sh) - HALF
            if abs(y) > 2**15 + 1:  # saturates at any width: the sign must be right
                assert exact.sign(got) == exact.sign(y) and abs(got) > 2**15, f"x={v}"
                continue
            if abs(k * (ch.m * v - ch.s)) > 2**21:
                continue
            errs.add(got - y, exact.forward16_bound(k, ch.m * v - ch.s, sh),
                     f"forward_params (centred) at x={v}")
    errs.unbiased(0.01, "forward_params (centred)", bias=bias)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("wide", [False, True])
def test_forward_params_within_bound_and_unbiased(wide, seed):
    (check_forward_params_centred if wide else check_forward_params)(forward_cases(wide, seed=seed))


# --- backward parameters and dgamma (sections 4 and 5) -------------------------------------------


def check_backward_params(cases, fn=backward_params, bias=True):
    """int8 (plain form, c_s = 0): (A g + B_s)/2**sh - 1/2 within section 5's bound of equation
    (20), for every g in the channel's range and every sign, where the amplification
    a <= 2**23."""
    errs = Errors()
    checked = 0
    for _, g, ch, gc, eps_shift, gq, k_shift in cases:
        bound = exact.backward8_bound(exact.amplification(ch, gc, gq, k_shift, eps_shift))
        if bound is None:
            continue
        checked += 1
        rm, re = reciprocal(ch, eps_shift)
        a, b, c, sh = fn(ch.s, ch.m, ch.s // ch.m, ch.sign_sum, rm, re, gc.sg, gc.sgx,
                         gc.g_min, gc.g_max, gq, k_shift, *inv_m(ch.m), False)
        a, sh, b = int(a), int(sh), [int(v) for v in b]
        assert not np.any(c)
        if ch.d_eps(eps_shift) == 0:  # constant channel: no error passes (section 2)
            assert all((a * gv + bj) >> sh == 0 for gv in (gc.g_min, gc.g_max) for bj in b)
            continue
        for gv in range(gc.g_min, gc.g_max + 1):
            for s in (-1, 0, 1):
                y = exact.backward_value(ch, gc, gv, s, gq, k_shift, eps_shift)
                got = Fraction(a * gv + b[s + 1], 2**sh) - HALF
                errs.add(got - y, bound, f"backward_params at g={gv}, s={s}")
    assert checked >= len(cases) // 2
    errs.unbiased(0.01, "backward_params", bias=bias)


def check_backward_params_centred(cases, fn=backward_params, bias=True):
    """16-bit (centred form): (A (g - c_s) + B_s)/2**sh - 1/2 within section 5's 16-bit bound,
    where a' <= 2**24, for every output that does not saturate at 16 bits."""
    errs = Errors()
    rng = np.random.default_rng(2)
    checked = 0
    for x, g, ch, gc, eps_shift, gq, k_shift in cases:
        bound = exact.backward16_bound(
            exact.deviation_amplification(ch, gc, gq, k_shift, eps_shift), 32767)
        if bound is None:
            continue
        checked += 1
        rm, re = reciprocal(ch, eps_shift)
        a, b, c, sh = fn(ch.s, ch.m, ch.s // ch.m, ch.sign_sum, rm, re, gc.sg, gc.sgx,
                         gc.g_min, gc.g_max, gq, k_shift, *inv_m(ch.m), True)
        a, sh, b, c = int(a), int(sh), [int(v) for v in b], [int(v) for v in c]
        if ch.d_eps(eps_shift) == 0:  # constant channel: no error passes (section 2)
            assert all((a * (gv - cj) + bj) >> sh == 0 for gv in (gc.g_min, gc.g_max)
                       for bj, cj in zip(b, c))
            continue
        for gv in some_codes(gc.g_min, gc.g_max, rng):
            for s in (-1, 0, 1):
                y = exact.backward_value(ch, gc, gv, s, gq, k_shift, eps_shift)
                if abs(y) > 2**15:
                    continue
                got = Fraction(a * (gv - c[s + 1]) + b[s + 1], 2**sh) - HALF
                errs.add(got - y, bound, f"backward_params (centred) at g={gv}, s={s}")
    assert checked >= len(cases) // 2
    errs.unbiased(0.01, "backward_params (centred)", bias=bias)


def check_dgamma(cases, fn=dgamma_code, bias=True):
    """round(m P / D_eps * 2**shift), from P's dyadic: within 1/2 code plus 8.5 eps0 relative
    (section 4), and unbiased."""
    errs = Errors()
    for shift in (-16, -3, 0, 9):
        for _, g, ch, gc, eps_shift, *_ in cases:
            rm, re = reciprocal(ch, eps_shift)
            pm, pe = grad_p_dyadic(ch.s, ch.m, ch.s // ch.m, gc.sg, gc.sgx)
            code = int(fn(ch.m, pm, pe, rm, re, shift))
            z = exact.dgamma_value(ch, gc, shift, eps_shift)
            errs.add(code - z, HALF + exact.DGAMMA_REL * abs(z), f"dgamma at shift {shift}",
                     record=abs(z) < 2**20)
    # fewer values than the affines give (about 300): 0.1 is 6 standard errors of their mean
    errs.unbiased(0.1, "dgamma", bias=bias)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("wide", [False, True])
def test_backward_params_within_bound_and_unbiased(wide, seed):
    check = check_backward_params_centred if wide else check_backward_params
    check(backward_cases(wide, seed=seed))


@pytest.mark.parametrize("wide", [False, True])
def test_dgamma_code_within_bound_and_unbiased(wide):
    check_dgamma(backward_cases(wide, n=80))


@pytest.mark.parametrize("wide", [False, True])
def test_grad_p_dyadic_truncates_the_exact_p(wide):
    """P = m sum(g x) - S sum(g), exact in two limbs (up to 2**77 for 16-bit codes), truncated
    toward zero; for int8 codes exactly dy_norm(P, 0)."""
    for _, _, ch, gc, *_ in backward_cases(wide, n=60):
        pm, pe = grad_p_dyadic(ch.s, ch.m, ch.s // ch.m, gc.sg, gc.sgx)
        check_truncated(pm, pe, Fraction(gc.p))
        if not wide:
            assert (pm, pe) == tuple(dy_norm(gc.p, 0))


# --- the largest channels (m up to M_MAX = 2**23, section 6) -------------------------------------


def large_cases(wide: bool):
    """Channels of m = 2**20 and 2**23 given by their distinct codes and counts (skewed to the
    limits, an integer mean, a near-constant channel far from 0, many levels), each with error
    codes constant per code: aligned with the signs (the largest offsets) or not. Returns
    forward cases and backward cases in the shapes the checks take."""
    top = 32767 if wide else 127
    rng = np.random.default_rng(9 + wide)
    fwd, bwd = [], []
    for m in (1 << 20, M_MAX):
        spread = rng.integers(-top, top + 1, 200)
        layouts = [
            ([-top - 1, top, 5], [m // 2, m // 2 - 1, 1]),
            ([top, -top - 1], [m - 1, 1]),
            ([-top, 0, top], [m // 4, m // 2, m // 4]),                     # integer mean
            ([top // 2, top // 2 + 1], [m - 3, 3]),                         # near-constant
            (sorted(set(spread.tolist())), None),
        ]
        for values, counts in layouts:
            if counts is None:
                counts = [m // len(values)] * len(values)
                counts[0] += m - sum(counts)
            ch = exact.Channel.from_counts(values, counts)
            for eps_shift in (None, -10):
                gq = int(rng.integers(1000, 1 << 16))
                fwd.append((None, ch, eps_shift, gq, int(rng.integers(-30, -8)),
                            int(rng.integers(-(2**12), 2**12)), int(rng.integers(-12, 0))))
                for aligned in (True, False):
                    g = [top * ch.sgn(v) if aligned else int(rng.integers(-top, top + 1))
                         for v in values]
                    gc = exact.GradChannel.from_groups(ch, list(zip(values, g, counts)))
                    bwd.append((None, None, ch, gc, eps_shift, gq, int(rng.integers(-40, -10))))
    return fwd, bwd


@pytest.mark.parametrize("wide", [False, True])
def test_largest_channels_within_bounds(wide):
    """Every per-channel check on channels of m = 2**20 and M_MAX, where the sums, P and the
    offsets are largest (section 6): the same bounds hold."""
    fwd, bwd = large_cases(wide)
    check_mean_thresholds(fwd)
    check_dev_reciprocal(fwd)
    if wide:
        check_forward_params_centred(fwd, bias=False)
        check_backward_params_centred(bwd, bias=False)
    else:
        check_forward_params(fwd, bias=False)
        check_backward_params(bwd, bias=False)
    check_dgamma(bwd, bias=False)
    check_running_update(fwd, x_exp=-12 if wide else -4, bias=False)


# --- exponents chosen from the range (sections 2 and 4) ------------------------------------------


def layer_cases(wide: bool, n_layers: int = 25, seed: int = 0):
    """Layers of 1-5 channels with one m: (list of (codes, Channel), gamma_q, beta_q, eps)."""
    rng = np.random.default_rng(seed + 50 + 1000 * wide)
    top = 32767 if wide else 127
    layers = []
    for _ in range(n_layers):
        n, c = int(rng.choice([2, 16, 200])), int(rng.integers(1, 6))
        xs = [rng.integers(-top, top + 1, n) for _ in range(c)]
        if rng.random() < 0.3:
            xs[0][:] = xs[0][0]  # a constant channel
        xs = [x.astype(np.int16 if wide else np.int8) for x in xs]
        gamma_q = rng.integers(-(2**16), 2**16, c).astype(np.int64)
        beta_q = rng.integers(-(2**12), 2**12, c).astype(np.int64)
        if rng.random() < 0.2:
            gamma_q[:] = 0
        eps = None if rng.random() < 0.5 else int(rng.integers(-20, 0))
        layers.append(([(x, exact.Channel.of(x)) for x in xs], gamma_q, beta_q, eps))
    return layers


def stats_table(chans, eps_shift) -> np.ndarray:
    """The kernels' statistics layout, filled from exact values (and the reciprocal)."""
    t = np.zeros((len(chans), N_STATS), dtype=np.int64)
    for i, (_, ch) in enumerate(chans):
        t[i, ST_SUM], t[i, ST_DEV], t[i, ST_SIGNSUM] = ch.s, ch.dev, ch.sign_sum
        t[i, ST_TLO], t[i, ST_THI] = -((-ch.s) // ch.m) - 1, ch.s // ch.m + 1
        t[i, ST_RMANT], t[i, ST_REXP] = reciprocal(ch, eps_shift)
        t[i, ST_MIN], t[i, ST_MAX] = min(ch.values), max(ch.values)
    return t


def check_top_half(top: Fraction, bits: int, what: str, slack=4 * EPS0):
    """The largest |value| lies in [2**(bits-2), 2**(bits-1)) LSBs, up to the dyadic bound's
    relative truncation (a few truncations of 2**-30 each: 4 eps0)."""
    assert top < pow2(bits - 1) * (1 + slack), f"{what}: {float(top)} saturates"
    assert top >= pow2(bits - 2) * (1 - slack), f"{what}: {float(top)} below the top half"


def check_output_exponent(layers, fn=output_exponent):
    """out_exp from the range: the largest exact |y| over each channel's smallest and largest
    code lies in the top half of the format; all-zero outputs get beta_exp (section 2)."""
    for chans, gamma_q, beta_q, eps_shift in layers:
        m = chans[0][1].m
        for bits in (4, 8, 16):
            e = int(fn(stats_table(chans, eps_shift), m, gamma_q, -12, beta_q, -12, bits))
            top = max(abs(exact.forward_value(ch, v, int(gamma_q[i]), -12 - e, int(beta_q[i]),
                                              -12 - e, eps_shift))
                      for i, (_, ch) in enumerate(chans) for v in (min(ch.values),
                                                                  max(ch.values)))
            if top == 0:
                assert e == -12
            else:
                check_top_half(top, bits, f"output_exponent, {bits} bits")


def check_grad_exponent(layers, fn=grad_exponent, wide=False):
    """dx_exp from the range: the largest exact corner of equation (20), over g in
    {min g, max g} and s in {-1, +1} on every non-constant channel, lies in the top half
    (section 4); all-zero corners give k_base."""
    rng = np.random.default_rng(3)
    for chans, gamma_q, _, eps_shift in layers:
        m = chans[0][1].m
        gcs = []
        gstats = np.zeros((len(chans), N_GSTATS), dtype=np.int64)
        for i, (x, ch) in enumerate(chans):
            gc = exact.GradChannel.of(ch, x, grad_codes(rng, x, ch, wide))
            gstats[i, [GS_SUM, GS_SUMX, GS_MIN, GS_MAX]] = gc.sg, gc.sgx, gc.g_min, gc.g_max
            gcs.append(gc)
        k_base = -12 + (-14 if wide else -6) - (-4)
        for bits in (4, 8, 16):
            e = int(fn(stats_table(chans, eps_shift), gstats, m, gamma_q, k_base, bits))
            top = max((abs(exact.backward_value(ch, gc, gv, s, int(gamma_q[i]), k_base - e,
                                                eps_shift))
                       for i, ((_, ch), gc) in enumerate(zip(chans, gcs)) if ch.d_eps(eps_shift)
                       for gv in (gc.g_min, gc.g_max) for s in (-1, 1)), default=Fraction(0))
            if top == 0:
                assert e == k_base
            else:
                check_top_half(top, bits, f"grad_exponent, {bits} bits")


@pytest.mark.parametrize("wide", [False, True])
def test_output_exponent_puts_the_largest_output_in_the_top_half(wide):
    check_output_exponent(layer_cases(wide))


@pytest.mark.parametrize("wide", [False, True])
def test_grad_exponent_puts_the_largest_corner_in_the_top_half(wide):
    check_grad_exponent(layer_cases(wide), wide=wide)


# --- running statistics and folded inference (section 7) -----------------------------------------


def check_running_update(cases, fn=running_update, x_exp=-4, bias=True):
    """The batch mean S/m and deviation D/m**2 in RUN_EXP codes within 1/2 + 2.5 eps0 and
    1/2 + 6 eps0 relative of the exact values (read with momentum 1), and the momentum step
    new = sat(old + round_half_up(momentum_q * (sat(batch) - old) / 2**16)) exactly."""
    rng = np.random.default_rng(4)
    errs = Errors()
    for _, ch, *_ in cases:
        table = np.zeros((1, N_STATS), dtype=np.int64)
        table[0, ST_SUM], table[0, ST_DEV] = ch.s, ch.dev
        mean, dev = np.zeros(1, np.int64), np.zeros(1, np.int64)
        fn(mean, dev, table, ch.m, x_exp, 1 << MOMENTUM_BITS)
        for got, want, rel in ((mean[0], exact.batch_mean_code(ch, x_exp, RUN_EXP), 2.5),
                               (dev[0], exact.batch_dev_code(ch, x_exp, RUN_EXP), 6)):
            errs.add(int(got) - want, HALF + Fraction(rel) * EPS0 * abs(want), "batch statistic")
        batch = (int(mean[0]), int(dev[0]))
        for _ in range(3):
            old = [int(v) for v in rng.integers(-(2**45), 2**45, 2)]
            mq = int(rng.integers(0, (1 << MOMENTUM_BITS) + 1))
            new_mean, new_dev = np.array(old[:1], np.int64), np.array(old[1:], np.int64)
            fn(new_mean, new_dev, table, ch.m, x_exp, mq)
            lim = int(RUN_LIMIT)
            for got, o, b in ((new_mean[0], old[0], batch[0]), (new_dev[0], old[1], batch[1])):
                o = exact.saturate(o, lim)
                step = exact.round_half_up(Fraction(mq * (exact.saturate(b, lim) - o),
                                                    1 << MOMENTUM_BITS))
                assert int(got) == exact.saturate(o + step, lim)
    errs.unbiased(0.1, "running statistics", min_count=100, bias=bias)


def running_stats(rng, wide: bool, c: int):
    """Running mean and deviation codes (RUN_EXP) of realistic and edge magnitudes."""
    top = 2.0**15 if wide else 128.0
    x_exp = -12 if wide else -4
    scale = 2.0 ** (x_exp - RUN_EXP)
    mean = (rng.uniform(-top, top, c) * scale).astype(np.int64)
    dev = (rng.uniform(0, top / 2, c) * scale).astype(np.int64)
    mean[0], dev[0] = 0, 0
    if c > 2:
        mean[1], dev[1] = 5, 1  # far below one input code
    return mean, dev, x_exp


def check_inference_params(n_layers=30, fn=inference_params, wide=False):
    """Folded inference: (A x + B)/2**sh - 1/2 within E + |slope per code| * 2**-(f+1) of
    gamma*(x - mu)/(sigma + eps) + beta (E: the forward's narrow bound, 0.073 for int8 and 0.08
    for 16-bit codes; the second term is mu's rounding to f fractional bits; section 7), for
    every code whose output does not saturate at 16 bits."""
    rng = np.random.default_rng(5 + wide)
    errs = Errors()
    for _ in range(n_layers):
        c = int(rng.integers(1, 6))
        mean, dev, x_exp = running_stats(rng, wide, c)
        gamma_q = rng.integers(-(2**14), 2**14, c).astype(np.int64)
        beta_q = rng.integers(-(2**12), 2**12, c).astype(np.int64)
        eps_shift = None if rng.random() < 0.5 else int(rng.integers(-24, 0)) - x_exp
        gs, bs = -12 - int(rng.integers(-16, -2)), int(rng.integers(-6, 6))
        rows = fn(gamma_q, gs, beta_q, bs, mean, dev, x_exp,
                  0 if eps_shift is None else eps_shift, eps_shift is not None, wide)
        to_code = RUN_EXP - x_exp
        lo_code, hi_code = (-(2**15), 2**15 - 1) if wide else (-128, 127)
        for i in range(c):
            a, b, sh = (int(v) for v in rows[i])
            mu = int(mean[i]) * pow2(to_code)
            f = max(0, 30 - max(16 if wide else 8, _bits(mu) + 1))
            den = max(int(dev[i]), 0) * pow2(to_code) + (0 if eps_shift is None
                                                          else pow2(eps_shift))
            slope = 0 if den == 0 else abs(int(gamma_q[i]) * pow2(gs) / den)
            bound = (exact.FORWARD16_NARROW if wide else exact.FORWARD8) + slope * pow2(-(f + 1))
            for v in some_codes(lo_code, hi_code, rng):
                y = exact.inference_value(v, int(gamma_q[i]), gs, int(beta_q[i]), bs,
                                          int(mean[i]), int(dev[i]), to_code, eps_shift)
                if abs(y) > 2**15:
                    continue
                errs.add(Fraction(a * v + b, 2**sh) - HALF - y, bound, f"inference at x={v}")
    errs.unbiased(0.01, "inference_params")


def _bits(v: Fraction) -> int:
    """The smallest b with |v| < 2**b (0 for 0)."""
    if v == 0:
        return 0
    b = math.floor(math.log2(abs(v))) + 1
    while pow2(b - 1) > abs(v):
        b -= 1
    while pow2(b) <= abs(v):
        b += 1
    return b


def test_running_update_within_bound_and_exact_momentum():
    check_running_update(forward_cases(False, n=60))
    check_running_update(forward_cases(True, n=60), x_exp=-12)


@pytest.mark.parametrize("wide", [False, True])
def test_inference_params_within_bound_and_unbiased(wide):
    check_inference_params(wide=wide)


# --- positive controls: biased variants of the real functions must be flagged --------------------


def floor_variant(fn, b_index=1, sh_index=-1):
    """fn with round half up turned into floor: the folded half 2**(sh-1) taken out of B."""
    def variant(*args):
        out = list(fn(*args))
        sh = int(out[sh_index])
        out[b_index] = out[b_index] - (1 << (sh - 1))
        return tuple(out)
    return variant


def half_bit_off_variant(fn, b_index=1, sh_index=-1):
    """fn with the rounding constant one bit too large (2**sh for 2**(sh-1)): +1/2 LSB."""
    def variant(*args):
        out = list(fn(*args))
        out[b_index] = out[b_index] + (1 << (int(out[sh_index]) - 1))
        return tuple(out)
    return variant


def rows_floor_variant(fn):
    def variant(*args):
        rows = fn(*args).copy()
        rows[:, 1] -= np.int64(1) << (rows[:, 2] - 1)
        return rows
    return variant


def small_bias_variant(fn, b_index=1, sh_index=-1, lsb=Fraction(1, 8)):
    """A bias below one LSB (1/8): inside "within 1 LSB", outside the exact bounds."""
    def variant(*args):
        out = list(fn(*args))
        sh = int(out[sh_index])
        out[b_index] = out[b_index] - int(lsb * 2**sh)
        return tuple(out)
    return variant


CONTROLS = {
    "forward_params floor": lambda: check_forward_params(forward_cases(False),
                                                         floor_variant(forward_params)),
    "forward_params half bit off": lambda: check_forward_params(
        forward_cases(False), half_bit_off_variant(forward_params)),
    "forward_params 1/8 LSB bias": lambda: check_forward_params(
        forward_cases(False), small_bias_variant(forward_params)),
    "forward_params centred floor": lambda: check_forward_params_centred(
        forward_cases(True), floor_variant(forward_params, b_index=1)),
    "backward_params floor": lambda: check_backward_params(
        backward_cases(False), floor_variant(backward_params)),
    "backward_params centred floor": lambda: check_backward_params_centred(
        backward_cases(True), floor_variant(backward_params)),
    "dgamma_code one shift low, floored": lambda: check_dgamma(
        backward_cases(False, n=80),
        lambda m, pm, pe, rm, re, shift: dgamma_code(m, pm, pe, rm, re, shift + 1) >> 1),
    "dgamma_code 16-bit one shift low, floored": lambda: check_dgamma(
        backward_cases(True, n=80),
        lambda m, pm, pe, rm, re, shift: dgamma_code(m, pm, pe, rm, re, shift + 1) >> 1),
    "dev_reciprocal with a 19-bit mantissa": lambda: check_dev_reciprocal(
        forward_cases(False), lambda *a: ((dev_reciprocal(*a)[0] >> 12) << 12,
                                          dev_reciprocal(*a)[1])),
    "mean_thresholds ignoring an integer mean": lambda: check_mean_thresholds(
        forward_cases(False), lambda s, m, im, ie: (mean_thresholds(s, m, im, ie)[1] - 1,
                                                    mean_thresholds(s, m, im, ie)[1])),
    "output_exponent one high": lambda: check_output_exponent(
        layer_cases(False), lambda *a: output_exponent(*a) + 1),
    "output_exponent one low": lambda: check_output_exponent(
        layer_cases(False), lambda *a: output_exponent(*a) - 1),
    "grad_exponent one high": lambda: check_grad_exponent(
        layer_cases(False), lambda *a: grad_exponent(*a) + 1),
    "grad_exponent 16-bit one low": lambda: check_grad_exponent(
        layer_cases(True), lambda *a: grad_exponent(*a) - 1, wide=True),
    "inference_params floor": lambda: check_inference_params(
        fn=rows_floor_variant(inference_params)),
    "inference_params 16-bit floor": lambda: check_inference_params(
        fn=rows_floor_variant(inference_params), wide=True),
    "running_update one code low": lambda: check_running_update(
        forward_cases(False, n=60), _one_code_low(running_update)),
}


def _one_code_low(fn):
    def variant(mean, dev, *args):
        fn(mean, dev, *args)
        mean -= 1
    return variant


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_biased_variant_is_flagged(name):
    """Control: each check fails on a biased variant of the real function it checks."""
    with pytest.raises(AssertionError):
        CONTROLS[name]()


# --- the reference itself against the paper's equations as written ------------------------------


def test_exact_reference_is_the_papers_equations():
    """qkernels.exact's integer forms (K (m x - S) + beta; equation (20) as K_b (m g - sum g) -
    K_b P/D_eps (m s - sum s); m P / D_eps) equal equations (9)-(11) and (20) written with mu,
    sigma and xhat, on exact rationals."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        m = int(rng.integers(2, 12))
        x = rng.integers(-5, 6, m)
        g = rng.integers(-9, 10, m)
        eps_shift = None if rng.random() < 0.5 else int(rng.integers(-6, 2))
        gq, gs, bq, bs, ks = (int(v) for v in rng.integers(-50, 50, 5))
        ch = exact.Channel.of(x)
        gc = exact.GradChannel.of(ch, x, g)
        mu = Fraction(int(x.sum()), m)
        sigma = sum(abs(int(v) - mu) for v in x) / m                      # equation (10)
        den = sigma + (0 if eps_shift is None else pow2(eps_shift))
        if den == 0:
            continue
        xhat = [(int(v) - mu) / den for v in x]                           # equation (11)
        gamma, beta = gq * pow2(gs), bq * pow2(bs)
        for v, xh in zip(x, xhat):
            assert exact.forward_value(ch, v, gq, gs, bq, bs, eps_shift) == gamma * xh + beta
        gk = gq * pow2(ks)                     # dx in units of 2**-ks of the error's scale
        s = [exact.sign(xh) for xh in xhat]
        mean_g, mean_s = Fraction(int(g.sum()), m), Fraction(sum(s), m)
        mean_gx = sum(int(gv) * xh for gv, xh in zip(g, xhat)) / m
        for gv, sv in zip(g, s):                                          # equation (20)
            want = gk / den * (int(gv) - mean_g - mean_gx * (sv - mean_s))
            assert exact.backward_value(ch, gc, int(gv), sv, gq, ks, eps_shift) == want
        assert exact.dgamma_value(ch, gc, 0, eps_shift) == sum(
            int(gv) * xh for gv, xh in zip(g, xhat))
