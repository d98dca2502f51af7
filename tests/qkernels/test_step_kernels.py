"""Kernels of the training step against plain-Python integer oracles."""

from fractions import Fraction

import numpy as np
import pytest
from numba import njit

from qkernels import QTensor
from qkernels import ieee
from qkernels.fixedpoint import MOMENTUM_BITS
from qkernels.ieee import (codes_to_f32, f32_to_codes, f32_to_codes_where, peak_exponent,
                           quantize_f32, quantize_f32_to_codes)
from qkernels.loss import EXP2_TABLE, PROB_BITS, softmax_xent_error
from qkernels.optim import (LR_BITS, F32Store, decay_code, lr_code, momentum_code, sgd_step,
                            sgd_step_f32, sgd_step_f32_inplace)
from qkernels.quant import (CHUNK, LANES, _nearest32_p, _nearest32_s, _nearest_s, mean_exponent,
                            quantize_nearest, quantize_stochastic, range_exponent)
from qkernels.rng import random_u64_np, stream_key_np


def nearest_oracle(codes, exp, bits):
    """Round half up at the exponent that puts the largest value in [2**(bits-2), 2**(bits-1))."""
    top = max(abs(int(c)) for c in codes)
    e = exp if top == 0 else top.bit_length() + exp - (bits - 1)
    q = 2 ** (bits - 1) - 1
    out = []
    for c in codes:
        v = Fraction(int(c)) * Fraction(2) ** (exp - e)
        out.append(max(-q, min(q, int((v + Fraction(1, 2)) // 1))))
    return out, e


@pytest.mark.parametrize("bits", [2, 3, 8, 12, 16])
@pytest.mark.parametrize("exp", [-20, 0, 7])
def test_nearest_matches_exact_rational_rounding(bits, exp):
    """quantize_nearest is round-half-up of the exact value at the range exponent."""
    rng = np.random.default_rng(bits * 100 + exp + 50)
    c = rng.integers(-(1 << 20), 1 << 20, 500)
    c[:4] = [0, 1, -1, 3]
    got, counts = quantize_nearest(QTensor(c, exp), bits)
    want, e = nearest_oracle(c, exp, bits)
    assert got.exp == e and got.q.tolist() == want
    q = 2 ** (bits - 1) - 1
    assert counts.saturated == sum(abs(int((Fraction(int(v)) * Fraction(2) ** (exp - e)
                                            + Fraction(1, 2)) // 1)) > q for v in c)
    assert counts.zeroed == sum(1 for v, y in zip(c, want) if v != 0 and y == 0)


def _nearest_edge_cases(dtype, shift: int, rng) -> np.ndarray:
    """Random codes of ``dtype`` plus the cases the int32 lanes must get right at ``shift``:
    ties either side of zero, the extremes, zero, and values just inside and beyond half."""
    info = np.iinfo(dtype)
    half = 1 << max(shift - 1, 0)
    edges = [0, 1, -1, half, -half, half - 1, -half - 1, 3 * half, -3 * half,
             info.max, info.min, info.max - half, info.min + half]
    edges = [v for v in edges if info.min <= v <= info.max]
    # not a multiple of LANES, and longer than CHUNK: several tasks and a scalar tail
    body = rng.integers(info.min, info.max, CHUNK + 3 * LANES + 7, dtype=np.int64, endpoint=True)
    body[:len(edges)] = edges
    return body.astype(dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_nearest_int32_lanes_equal_the_int64_kernel(dtype):
    """The int32-lane rounding (every shift it takes: 1..31, and 0 for int8/int16 codes; several
    widths) gives the codes and counts of the int64 kernel, serial and parallel."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    seen = np.zeros(2, np.int64)  # saturated and zeroed codes over all cases
    for shift in range(0 if dtype != np.int32 else 1, 32):
        c = _nearest_edge_cases(dtype, shift, rng)
        for bits in (2, 8, 12, 16):
            q = (1 << (bits - 1)) - 1
            want = np.empty(c.size, np.int16)
            want_counts = _nearest_s(c, shift, q, want)
            seen += want_counts
            for kernel in (_nearest32_s, _nearest32_p):
                got = np.empty(c.size, np.int16)
                assert kernel(c, shift, q, got) == want_counts, (shift, bits, kernel)
                np.testing.assert_array_equal(got, want, err_msg=f"shift {shift} bits {bits}")
    assert seen.min() > 1000  # the cases both saturate and round to zero


def _float_soup(rng, n: int) -> np.ndarray:
    """float32 bit patterns of every kind: uniform over all 2**32 patterns (every exponent,
    subnormals, infinities, NaNs), then small codes, signed zeros and the largest floats."""
    bits = rng.integers(-(1 << 31), 1 << 31, n, dtype=np.int64).astype(np.int32)
    codes = rng.integers(-300, 301, n // 4).astype(np.float32) * np.float32(2.0 ** -9)
    bits[:codes.size] = codes.view(np.int32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45, -1e-45,
                        2.0 ** -126, 0.5, -0.5, 1.5, -1.5], np.float32).view(np.int32)
    bits[codes.size:codes.size + special.size] = special
    return bits


@njit
def _plain_quantize_nearest(bits, out, e, q, up):
    """The rounding of a float32 container as one plain loop with scalar counts."""
    saturated = 0
    zeroed = 0
    for i in range(bits.shape[0]):
        code = ieee._code_at(bits[i], e)
        y = min(max(code, -q), q)
        saturated += y != code
        zeroed += (y == 0) and (bits[i] & 0x7FFFFFFF) != 0
        out[i] = ieee._encode(y, e) if up < 0 else y << up
    return saturated, zeroed


@njit
def _plain_to_codes_exact(bits, out, e):
    """The exact conversion as one plain loop: a value is inexact when a set bit of its
    mantissa lies below 2**e."""
    inexact = 0
    for i in range(bits.shape[0]):
        a = np.int64(bits[i]) & 0x7FFFFFFF
        f = a >> 23
        m = (a & 0x7FFFFF) | ((f > 0) << 23)
        lsb = max(f, 1) - 150  # the exponent of the mantissa's last bit
        if e > lsb:
            inexact += (m & ((np.int64(1) << min(e - lsb, 40)) - 1)) != 0
        out[i] = ieee._code_at(bits[i], e)
    return inexact


def test_chunked_ieee_kernels_equal_a_plain_loop():
    """The chunked rounding and exact conversion of float32 bit patterns (per-position
    counts, scalar tails, several tasks) give a plain loop's results and counts at every
    exponent: container and code outputs, serial and parallel."""
    rng = np.random.default_rng(32)
    b = _float_soup(rng, CHUNK + 5 * LANES + 3)
    seen = np.zeros(3, np.int64)
    for e in range(-126, 127, 3):
        for bits, up in ((2, -1), (8, -1), (16, -1), (8, 0), (8, 7), (12, 3), (16, 14)):
            q = (1 << (bits - 1)) - 1
            dtype = np.int32 if up < 0 else (np.int8 if bits - 1 + up <= 7 else np.int32)
            want = np.empty(b.size, dtype)
            want_counts = _plain_quantize_nearest(b, want, e, q, up)
            seen[:2] += want_counts
            for kernel in (ieee._quantize_nearest_s, ieee._quantize_nearest_p):
                got = np.empty(b.size, dtype)
                assert kernel(b, got, e, q, up) == want_counts, (e, bits, up)
                np.testing.assert_array_equal(got, want, err_msg=f"e {e} bits {bits} up {up}")
        for dtype in (np.int8, np.int16):
            want = np.empty(b.size, dtype)
            want_inexact = _plain_to_codes_exact(b, want, e)
            seen[2] += want_inexact
            for kernel in (ieee._to_codes_exact_s, ieee._to_codes_exact_p):
                got = np.empty(b.size, dtype)
                assert kernel(b, got, e) == want_inexact, (e, dtype)
                np.testing.assert_array_equal(got, want, err_msg=f"e {e} {dtype}")
    assert seen.min() > 1000  # the patterns saturate, round to zero and are inexact


def test_quantize_nearest_takes_int32_lanes_only_where_they_apply():
    """Codes move left (shift <= 0) or are int64: the int64 kernel; the results agree with
    the oracle either way."""
    c = np.array([5, -7, 0, 1 << 40, -(1 << 40) + 3], np.int64)
    got, counts = quantize_nearest(QTensor(c, 0), 8)
    want, e = nearest_oracle(c, 0, 8)
    assert (got.exp, got.q.tolist(), counts.zeroed) == (e, want, 2)
    small = np.array([3, -2, 1, 0], np.int8)
    got, counts = quantize_nearest(QTensor(small, 0), 8, -2)  # shift -2: codes move left
    assert got.q.tolist() == [12, -8, 4, 0] and counts.saturated == 0


def test_mean_exponent_is_floor_log2_of_the_mean():
    """e = floor(log2(mean|v|)) + 3 - bits, exactly (checked against rationals), whatever the
    codes' exponent; None for all zeros. At 2 bits the rounding threshold 2**(e-1) lies in
    (mean/2, mean]."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 50))
        c = rng.integers(-(1 << 20), 1 << 20, n) >> int(rng.integers(0, 20))
        exp, bits = int(rng.integers(-40, 40)), int(rng.integers(2, 17))
        s = int(np.abs(c).sum())
        got = mean_exponent(s, n, exp, bits)
        if s == 0:
            assert got is None
            continue
        mean = Fraction(s, n) * Fraction(2) ** exp
        j = got - 3 + bits
        assert Fraction(2) ** j <= mean < Fraction(2) ** (j + 1)
        assert mean_exponent(s << 5, n, exp - 5, bits) == got  # same values, finer codes
        if bits == 2:
            assert mean / 2 < Fraction(2) ** (got - 1) <= mean


def test_exponent_depends_only_on_values():
    """The same real values given with different exponents quantize identically."""
    c = np.array([5, -37, 1000, 0, 7], np.int64)
    a, _ = quantize_nearest(QTensor(c, -3), 6)
    b, _ = quantize_nearest(QTensor(c << 5, -8), 6)
    s1, _ = quantize_stochastic(QTensor(c, -3), 6, seed=1, step=2, tensor_id=3)
    s2, _ = quantize_stochastic(QTensor(c << 5, -8), 6, seed=1, step=2, tensor_id=3)
    assert a.exp == b.exp and np.array_equal(a.q, b.q)
    assert s1.exp == s2.exp and np.array_equal(s1.q, s2.q)
    assert range_exponent(0, 4, 8) == 4


def test_stochastic_matches_its_definition_and_is_unbiased():
    """y = (floor(v * 2**(24 - e)) + r24) >> 24 with the stream's top 24 bits; E[y] = v/2**e."""
    c = np.full(200_000, 1000, np.int64)
    c[0] = 4000  # sets the range: e = bit_length(4000) - 7 = 5
    y, _ = quantize_stochastic(QTensor(c, 0), 8, seed=9, step=4, tensor_id=2)
    r = random_u64_np(stream_key_np(9, 4, 2), np.arange(c.size, dtype=np.uint64)) >> np.uint64(40)
    want = ((c << 19) + r.astype(np.int64)) >> 24
    assert y.exp == 5 and np.array_equal(y.q, np.clip(want, -127, 127))
    mean = y.q[1:].astype(np.float64).mean()
    assert abs(mean - 1000 / 32) < 4 * 0.5 / np.sqrt(c.size)  # 31.25, std of a coin flip


@pytest.mark.parametrize("bits", [2, 5, 8, 16])
def test_ieee_kernels_equal_the_integer_quantizers(bits):
    """Quantizing a float32 container through its bit patterns equals quantizing its codes."""
    rng = np.random.default_rng(bits)
    c = rng.integers(-(1 << 22), 1 << 22, 5000)
    x = (c * 2.0 ** -30).astype(np.float32)
    y, e, counts = quantize_f32(x, bits)
    want, want_counts = quantize_nearest(QTensor(c, -30), bits)
    assert e == want.exp and tuple(counts) == tuple(want_counts)
    assert np.array_equal(y, (want.q * 2.0 ** e).astype(np.float32))
    ys, _, _ = quantize_f32(x, bits, stochastic=True, seed=1, step=2, tensor_id=3)
    ws, _ = quantize_stochastic(QTensor(c, -30), bits, seed=1, step=2, tensor_id=3)
    assert np.array_equal(ys, (ws.q * 2.0 ** ws.exp).astype(np.float32))


@pytest.mark.parametrize("base", [-126, -60, 0, 70])
def test_ieee_rounding_equals_integer_rounding_on_arbitrary_floats(base):
    """Any float32 values (full 24-bit mantissas over 30 binades, ties, both signs): rounding
    the bit patterns equals rounding their exact int64 codes, to a container and to codes."""
    rng = np.random.default_rng(base + 200)
    mant = rng.integers(-(1 << 24) + 1, 1 << 24, 4000)
    mant[:200] = (mant[:200] >> 5) << 5  # trailing zeros: ties at several widths
    c = mant << rng.integers(0, 30, mant.size)
    x = (c * 2.0 ** base).astype(np.float32)
    exact = QTensor(c, base)
    assert np.array_equal(exact.q * 2.0 ** exact.exp, x.astype(np.float64))
    for bits in (2, 3, 8, 13, 16):
        if peak_exponent(x) - bits < -125:
            continue  # results below float32's normal range are not containers
        y, e, counts = quantize_f32(x, bits)
        want, want_counts = quantize_nearest(exact, bits)
        assert e == want.exp and tuple(counts) == tuple(want_counts)
        assert np.array_equal(y.astype(np.float64), want.q * 2.0 ** e)
        codes, _ = quantize_f32_to_codes(x, bits, 15, np.int16)
        assert np.array_equal(codes.q.astype(np.int64), want.q.astype(np.int64) << (16 - bits))


@pytest.mark.parametrize("bits, dtype", [(2, np.int8), (5, np.int8), (8, np.int8),
                                         (8, np.int16), (12, np.int16), (16, np.int16)])
def test_fused_conversions_equal_their_two_step_forms(bits, dtype):
    """Rounding straight to codes, converting under a mask, and converting with a ReLU give
    what the separate steps give (codes, exponents and counts), zeros and ties included."""
    rng = np.random.default_rng(bits)
    width = 8 * np.dtype(dtype).itemsize - 1
    for scale in (-30, 0, 20):
        c = rng.integers(-(1 << 22), 1 << 22, (64, 3, 5))
        c[0, 0, :3] = [1 << 21, -(1 << 21) - (1 << 20), 0]  # a tie at most widths, and zero
        x = (c * 2.0 ** scale).astype(np.float32)
        got, counts = quantize_f32_to_codes(x, bits, width, dtype)
        y, _, want_counts = quantize_f32(x, bits)
        want = f32_to_codes(y, width, dtype)
        assert got.q.dtype == dtype and got.exp == want.exp and tuple(counts) == tuple(want_counts)
        assert np.array_equal(got.q, want.q)
        mask = rng.integers(-3, 3, x.shape).astype(np.int8)
        masked = f32_to_codes_where(x, mask, 23, np.int32)
        want = f32_to_codes(np.where(mask > 0, x, np.float32(0)), 23, np.int32)
        assert masked.exp == want.exp and np.array_equal(masked.q, want.q)
        relu = codes_to_f32(got, relu=True)
        assert np.array_equal(relu, codes_to_f32(QTensor(np.maximum(got.q, 0), got.exp)))
    zero, counts = quantize_f32_to_codes(np.zeros(7, np.float32), bits, width, dtype)
    assert zero.exp == 0 and not zero.q.any() and tuple(counts) == (0, 0, 7)
    none = f32_to_codes_where(np.ones(4, np.float32), np.zeros(4, np.int8), 7, np.int8)
    assert none.exp == 0 and not none.q.any()
    with pytest.raises(ValueError, match="cannot hold"):
        quantize_f32_to_codes(np.ones(3, np.float32), 9, 7, np.int8)
    with pytest.raises(ValueError, match="mask has"):
        f32_to_codes_where(np.ones(3, np.float32), np.ones(4, np.int8), 7, np.int8)


def test_ieee_codes_round_trip_including_denormals_and_zero():
    """f32_to_codes and codes_to_f32 are exact inverses for containers of codes of at most 24
    bits (denormals included); the peak exponent is frexp's."""
    for x in (np.array([0.0, -0.0, 1.5, 65504.0, -7.25], np.float32),
              np.array([-3e-39, 1e-40, 0.0], np.float32)):
        q = f32_to_codes(x, 24)
        assert np.array_equal(q.q * 2.0 ** q.exp, x.astype(np.float64))
        assert peak_exponent(x) == np.frexp(np.abs(x).max())[1]
    c = QTensor(np.array([1, -5, 1 << 23, 0, -(1 << 23) + 1], np.int32), -7)
    assert np.array_equal(codes_to_f32(c), (c.q * 2.0 ** -7).astype(np.float32))
    assert peak_exponent(np.zeros(4, np.float32)) is None


def test_softmax_error_is_close_to_base2_softmax():
    """The integer error is p - onehot of a base-2 softmax, within the table's precision."""
    rng = np.random.default_rng(0)
    z = rng.integers(-3000, 3000, size=(64, 10)).astype(np.int16)
    labels = rng.integers(0, 10, 64)
    err = softmax_xent_error(QTensor(z, -8), labels)
    logits = z * 2.0 ** -8
    p = 2.0 ** (logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = p - np.eye(10)[labels]
    assert err.exp == -PROB_BITS
    assert np.abs(err.q * 2.0 ** err.exp - want).max() < 2.0 ** -9
    assert EXP2_TABLE[0] == 1 << 15 and EXP2_TABLE[512] == round(2 ** 0.5 * 2 ** 15)


def xent_oracle(z, z_exp, labels):
    """The kernel's formula on Python integers (no shift limits)."""
    frac = 10
    out = []
    for row, y in zip(z.tolist(), labels.tolist()):
        top, v = max(row), []
        for zi in row:
            d, s = zi - top, z_exp + frac
            t = d << s if s >= 0 else (d + (1 << (-s - 1))) >> -s
            v.append(int(EXP2_TABLE[t & 1023]) >> -(t >> frac))
        r = (1 << 46) // sum(v)
        out.append([(vi * r >> 30) - ((1 << PROB_BITS) if i == y else 0)
                    for i, vi in enumerate(v)])
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("z_exp", [-20, -8, 0, 25, 31, 60, 120])
def test_softmax_error_equals_its_oracle_at_every_exponent(z_exp):
    """Coarse logits (a diverging run) saturate instead of overflowing or being refused: the
    errors equal the unbounded integer formula; ties at the top share the probability."""
    rng = np.random.default_rng(z_exp + 100)
    z = rng.integers(-32767, 32768, size=(40, 10)).astype(np.int64)
    z[0] = 5  # all tied
    z[1, :2] = z[1].max() + 1  # two tied at the top
    z[2, 3] = z[2].max() + 1  # one just above the rest
    labels = rng.integers(0, 10, 40)
    err = softmax_xent_error(QTensor(z, z_exp), labels)
    assert np.array_equal(err.q, xent_oracle(z, z_exp, labels))


def test_softmax_error_rejects_bad_labels():
    """Labels must index the logits' columns."""
    with pytest.raises(ValueError, match="labels"):
        softmax_xent_error(QTensor(np.zeros((2, 3), np.int16), 0), np.array([0, 3]))


def sgd_oracle(w, v, g, g_exp, w_exp, lr_q, mom_q, store_bits, exp_max=126, decay_q=0):
    def rshift(x, s):
        return x << -s if s <= 0 else (x + (1 << (s - 1))) >> s
    q = 2 ** (store_bits - 1) - 1
    vmax = 1 << 38
    w, v = [int(a) for a in w], [int(a) for a in v]
    for i, gi in enumerate(g):
        decay = rshift(decay_q * w[i], 24)  # round(decay_q * w / 2**24), half up
        gs = max(-vmax, min(vmax, rshift(int(gi), w_exp - g_exp) + decay))
        v[i] = max(-vmax, min(vmax, rshift(mom_q * v[i], MOMENTUM_BITS) + gs))
        w[i] = w[i] - rshift(lr_q * v[i], LR_BITS)
    s = 0
    while max(abs(rshift(x, s)) for x in w) > q and w_exp + s < exp_max:
        s += 1
    return [max(-q, min(q, rshift(x, s))) for x in w], [rshift(x, s) for x in v], s


@pytest.mark.parametrize("decay", [0.0, 128 * 5e-4, 1.5])
@pytest.mark.parametrize("g_exp, grows", [(-30, False), (-20, True), (-10, True), (30, True)])
def test_sgd_step_matches_its_formula(g_exp, grows, decay):
    """v = round(mu*v) + round(g aligned) + round(decay*w); w = w - round(lr*v), in integers; a
    code that would leave the store raises its exponent (w and v halved per step, rounded)
    instead of clipping; a gradient far above the store (a diverging run) saturates the
    velocity, no overflow."""
    rng = np.random.default_rng(abs(g_exp))
    w = rng.integers(-(1 << 22), 1 << 22, 300).astype(np.int32)
    v = rng.integers(-(1 << 30), 1 << 30, 300).astype(np.int64)
    g = rng.integers(-127, 128, 300).astype(np.int8)
    if grows:
        w[0] = -(1 << 23) + 2  # leaves the store
        v[0] = 1 << 34
    lr_q, mom_q, decay_q = lr_code(0.1 / 128), momentum_code(0.9), decay_code(decay)
    want_w, want_v, want_s = sgd_oracle(w, v, g, g_exp, -24, lr_q, mom_q, 24, decay_q=decay_q)
    res = sgd_step(QTensor(w, -24), v, QTensor(g, g_exp), lr_q=lr_q, momentum_q=mom_q,
                   store_bits=24, decay_q=decay_q)
    assert w.tolist() == want_w and v.tolist() == want_v and res == (want_s, 0)
    assert (res.rise >= 1) == grows


@pytest.mark.parametrize("n", [300, (1 << 16) + 4])  # 2-D as (n // 5, 5) too
@pytest.mark.parametrize("case", ["plain", "rise", "ceiling", "huge gradient"])
def test_sgd_step_on_containers_equals_the_step_on_codes(n, case):
    """sgd_step_f32 (gradient and new store as float32 containers) gives the store, velocity,
    result and container of converting, stepping and converting back; so does
    sgd_step_f32_inplace on the store's own container, written back in place."""
    rng = np.random.default_rng(n)
    w = rng.integers(-(1 << 22), 1 << 22, n).astype(np.int32)
    v = rng.integers(-(1 << 30), 1 << 30, n).astype(np.int64)
    g_exp = {"plain": -31, "rise": -20, "ceiling": -20, "huge gradient": 40}[case]
    grad = (rng.integers(-127, 128, n) * 2.0 ** g_exp).astype(np.float32)
    grad[:5] = [0.0, -0.0, 2.0 ** (g_exp + 7), -(2.0 ** (g_exp + 7)), 2.0 ** g_exp * 1.5]
    if case != "plain":
        w[:2], v[:2] = [(1 << 23) - 2, -(1 << 23) + 2], [-(1 << 36), 1 << 36]
    kw = dict(lr_q=lr_code(0.1 / 128), momentum_q=momentum_code(0.9), store_bits=24,
              exp_max=-24 if case == "ceiling" else 126, decay_q=decay_code(0.064))
    w2, v2 = w.copy(), v.copy()
    w2_start, v_start = w.copy(), v.copy()
    want = sgd_step(QTensor(w, -24), v, f32_to_codes(grad, 24), **kw)
    out = np.empty(n, np.float32)
    got = sgd_step_f32(QTensor(w2, -24), v2, grad, out, **kw)
    assert got == want and np.array_equal(w2, w) and np.array_equal(v2, v)
    assert np.array_equal(out, codes_to_f32(QTensor(w, -24 + want.rise)))
    param, v3 = codes_to_f32(QTensor(w2_start, -24)).reshape(-1, 5), v_start.copy()
    assert sgd_step_f32_inplace(param, -24, v3.reshape(-1, 5), grad.reshape(-1, 5), **kw) == want
    assert np.array_equal(param.reshape(-1), out) and np.array_equal(v3, v)
    assert (want.rise > 0) == (case in ("rise", "huge gradient"))
    assert (want.saturated > 0) == (case == "ceiling")


def test_a_store_steps_as_the_step_on_codes_every_time():
    """F32Store (arrays checked once) over several steps, its exponent rising on the way, keeps
    the container and velocity of sgd_step on int32 codes, with the same results; a gradient
    of another shape is refused."""
    rng = np.random.default_rng(7)
    w = rng.integers(-(1 << 22), 1 << 22, (40, 3)).astype(np.int32)
    w[0, 0] = (1 << 23) - 2
    param, velocity = codes_to_f32(QTensor(w, -24)), np.zeros((40, 3), np.int64)
    velocity2 = velocity.copy()
    store = F32Store(param, velocity, 24)
    kw = dict(lr_q=lr_code(0.1 / 128), momentum_q=momentum_code(0.9), decay_q=decay_code(0.064))
    exp, rises = -24, 0
    for step in range(6):
        grad = (rng.integers(-127, 128, (40, 3)) * 2.0 ** (-14 + step)).astype(np.float32)
        grad[0, 0] = -(2.0 ** (-7 + step))  # pushes the largest code out of the store
        got = store.step(exp, grad, **kw)
        want = sgd_step(QTensor(w, exp), velocity2, f32_to_codes(grad, 24), store_bits=24, **kw)
        exp, rises = exp + want.rise, rises + want.rise
        assert got == want
        assert np.array_equal(param, codes_to_f32(QTensor(w, exp)))
        assert np.array_equal(velocity, velocity2)
    assert rises > 0
    with pytest.raises(ValueError, match="shape"):
        store.step(exp, np.zeros((3, 40), np.float32), **kw)


def test_sgd_step_in_place_rejects_what_it_cannot_update():
    kw = dict(lr_q=lr_code(0.01), momentum_q=momentum_code(0.9), store_bits=24)
    param, v, g = np.zeros((4, 6), np.float32), np.zeros((4, 6), np.int64), np.zeros((4, 6),
                                                                                    np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        sgd_step_f32_inplace(param.T, -10, v.T.copy(), g.T.copy(), **kw)
    with pytest.raises(ValueError, match="outside 2..24"):
        sgd_step_f32_inplace(param, -10, v, g, **{**kw, "store_bits": 25})
    with pytest.raises(ValueError, match="shapes differ"):
        sgd_step_f32_inplace(param, -10, v[:2], g, **kw)


@pytest.mark.parametrize("ceiling", [0, 1])
def test_sgd_step_saturates_at_the_exponent_ceiling(ceiling):
    """At exp_max the exponent stops rising: codes that would leave the store saturate and
    are counted (a diverging run stays finite)."""
    rng = np.random.default_rng(ceiling)
    w = rng.integers(-(1 << 22), 1 << 22, 50).astype(np.int32)
    v = rng.integers(-(1 << 30), 1 << 30, 50).astype(np.int64)
    g = rng.integers(-127, 128, 50).astype(np.int8)
    w[:3] = [(1 << 23) - 2, -(1 << 23) + 2, (1 << 23) - 9]
    v[:3] = [-(1 << 36), 1 << 36, -(1 << 36)]  # all three push far out of the store
    lr_q, mom_q = lr_code(0.1), momentum_code(0.9)
    want_w, want_v, want_s = sgd_oracle(w, v, g, -20, -24, lr_q, mom_q, 24, -24 + ceiling)
    res = sgd_step(QTensor(w, -24), v, QTensor(g, -20), lr_q=lr_q, momentum_q=mom_q,
                   store_bits=24, exp_max=-24 + ceiling)
    assert w.tolist() == want_w and v.tolist() == want_v
    assert res.rise == want_s == ceiling
    assert res.saturated == sum(abs(x) == 2 ** 23 - 1 for x in want_w) >= 3


def test_sgd_step_rejects_bad_arguments():
    """Shapes, momentum and learning-rate ranges are checked, naming the argument."""
    w, v = np.zeros(3, np.int32), np.zeros(3, np.int64)
    g = QTensor(np.zeros(3, np.int8), -20)
    with pytest.raises(ValueError, match="momentum_q"):
        sgd_step(QTensor(w, -24), v, g, lr_q=10, momentum_q=1 << 16, store_bits=24)
    with pytest.raises(ValueError, match="lr_q"):
        sgd_step(QTensor(w, -24), v, g, lr_q=0, momentum_q=10, store_bits=24)
    with pytest.raises(ValueError, match="shapes"):
        sgd_step(QTensor(w, -24), v[:2], g, lr_q=10, momentum_q=10, store_bits=24)


def conv_weight_grad_oracle(x, e, k, stride, pad):
    """G[o, c, u, v] = sum_{n,i,j} e[n,o,i,j] * x[n, c, i*s+u-p, j*s+v-p], in int64 loops."""
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, o, oh, ow = e.shape
    g = np.zeros((o, x.shape[1], k, k), np.int64)
    for u in range(k):
        for v in range(k):
            patch = xp[:, :, u:u + stride * oh:stride, v:v + stride * ow:stride]
            g[:, :, u, v] = np.einsum("noij,ncij->oc", e.astype(np.int64), patch)
    return g


@pytest.mark.parametrize("shape, o, k, stride, pad", [
    ((4, 1, 12, 12), 3, 5, 1, 0), ((3, 2, 9, 9), 4, 3, 2, 1), ((2, 5, 7, 7), 2, 3, 1, 1)])
def test_conv_weight_grad_equals_int64_oracle(shape, o, k, stride, pad):
    """The integer conv weight gradient equals the int64 definition, extremes included."""
    from qkernels.conv import conv2d_weight_grad
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-127, 128, shape).astype(np.int8)
    oh = (shape[2] + 2 * pad - k) // stride + 1
    e = rng.integers(-127, 128, (shape[0], o, oh, oh)).astype(np.int8)
    x[0] = 127
    e[0] = -127
    g = conv2d_weight_grad(QTensor(x, -3), QTensor(e, -6), (k, k), stride, pad)
    assert g.exp == -9 and np.array_equal(g.q, conv_weight_grad_oracle(x, e, k, stride, pad))
    with pytest.raises(ValueError, match="e.q"):
        conv2d_weight_grad(QTensor(x, 0), QTensor(e[:, :, :-1], 0), (k, k), stride, pad)


def test_random_top_bits_is_the_stream():
    """random_top_bits(...) equals the numpy stream's top bits, element by element."""
    from qkernels.rng import random_top_bits
    want = random_u64_np(stream_key_np(4, 5, 6), np.arange(1000, dtype=np.uint64)) >> np.uint64(40)
    assert np.array_equal(random_top_bits(4, 5, 6, 1000, 24), want.astype(np.int64))


@pytest.mark.parametrize("grows", [False, True])
def test_sgd_step_parallel_path_matches_the_formula(grows):
    """Tensors of 2**16 elements and more take the multi-threaded kernel: same formula."""
    rng = np.random.default_rng(7)
    n = (1 << 16) + 3
    w = rng.integers(-(1 << 22), 1 << 22, n).astype(np.int32)
    v = rng.integers(-(1 << 30), 1 << 30, n).astype(np.int64)
    g = rng.integers(-127, 128, n).astype(np.int8)
    if grows:
        w[-1], v[-1] = (1 << 23) - 2, -(1 << 36)
    lr_q, mom_q = lr_code(0.1 / 128), momentum_code(0.9)

    def rshift(x, s):  # numpy int64, half up
        return x << -s if s <= 0 else (x + (1 << (s - 1))) >> s
    v_new = np.clip(rshift(mom_q * v, MOMENTUM_BITS) + rshift(g.astype(np.int64), -4),
                    -(1 << 38), 1 << 38)
    w_new = w - rshift(lr_q * v_new, LR_BITS)
    s = 0
    while np.abs(rshift(w_new, s)).max() > (1 << 23) - 1:
        s += 1
    res = sgd_step(QTensor(w, -24), v, QTensor(g, -20), lr_q=lr_q, momentum_q=mom_q,
                   store_bits=24)
    assert res == (s, 0) and (s > 0) == grows
    assert np.array_equal(w, rshift(w_new, s)) and np.array_equal(v, rshift(v_new, s))
