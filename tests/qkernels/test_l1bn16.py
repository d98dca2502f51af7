"""The 16-bit L1BN kernels (int16 x and/or dy) against the oracle (bit for bit), float64 (1 LSB)
and exact rationals; the int8 kernels are tested in test_l1bn.py."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkernels import QTensor, l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference
from qkernels import exact, l1bn_update_running, oracle
from qkernels.fixedpoint import (
    M_MAX,
    MOMENTUM_BITS,
    RUN_EXP,
    centred_lanes,
    dy_norm,
    dy_recip,
    grad_p,
    qmax,
    wide_add,
    wide_dy_norm,
    wide_from,
    wide_mul,
    wide_neg,
    wide_sat,
    wide_to_fixed,
)
from qkernels.l1bn import (
    ST_DEV,
    ST_MAX,
    ST_MIN,
    ST_REXP,
    ST_RMANT,
    ST_SIGNSUM,
    ST_SUM,
    ST_THI,
    ST_TLO,
    backward_params16,
    forward_params16,
)

SHAPES = [(64, 5), (4, 3, 5, 5)]
#: Every statistics column against the oracle's own statistics (the range columns where the
#: kernel tracks the range: 16-bit x, or an exponent chosen from the range).
STAT_COLUMNS = ((ST_SUM, "sum"), (ST_DEV, "dev"), (ST_SIGNSUM, "sign_sum"), (ST_TLO, "t_lo"),
                (ST_THI, "t_hi"), (ST_RMANT, "rmant"), (ST_REXP, "rexp"))
RANGE_COLUMNS = ((ST_MIN, "min"), (ST_MAX, "max"))


def codes(rng, shape, bits):
    """Uniform symmetric ``bits``-wide codes, int8 up to 8 bits, int16 above."""
    q = int(qmax(bits))
    return rng.integers(-q, q + 1, size=shape).astype(np.int8 if bits <= 8 else np.int16)


def make_case(shape, x_bits=16, g_bits=16, seed=0, gamma_scale=1.0, beta_scale=1.0):
    """Random x and dy codes; gamma/beta about +-1 in 2**-12 units."""
    rng = np.random.default_rng(seed)
    x = codes(rng, shape, x_bits)
    dy = codes(rng, shape, g_bits)
    n_channels = shape[1]
    gamma = (rng.uniform(-1.5, 1.5, n_channels) * gamma_scale * 4096).astype(np.int32)
    beta = (rng.uniform(-1, 1, n_channels) * beta_scale * 4096).astype(np.int32)
    return x, QTensor(gamma, -12), QTensor(beta, -12), dy


def x_exp_of(x):
    """An exponent putting the codes at about +-1..8 in real units."""
    return -12 if x.dtype == np.int16 else -4


def check_forward(x, gamma, beta, out_bits, out_exp, eps_log2=None, x_exp=None, parallel=True):
    """Kernel == oracle bit for bit, and within 1 LSB of float64 equations (10)-(11)."""
    x_exp = x_exp_of(x) if x_exp is None else x_exp
    y, cache = l1bn_forward(QTensor(x, x_exp), gamma, beta, out_bits=out_bits, out_exp=out_exp,
                            eps_log2=eps_log2, parallel=parallel)
    y_or, exp_or, stats = oracle.l1bn_forward_oracle(x, x_exp, gamma.q, gamma.exp, beta.q,
                                                     beta.exp, out_bits, out_exp, eps_log2)
    np.testing.assert_array_equal(y.q, y_or)
    assert y.q.dtype == (np.int8 if out_bits <= 8 else np.int16) and y.q.shape == x.shape
    assert y.exp == exp_or and (out_exp is None or y.exp == out_exp)
    y_f = oracle.l1bn_forward_float64(x, x_exp, gamma.q, gamma.exp, beta.q, beta.exp, out_bits,
                                      y.exp, eps_log2)
    assert np.abs(y.q.astype(np.int64) - y_f).max(initial=0) <= 1
    # within 1/2 + E of the exact rational value (E < 0.27, docs section 12)
    lo, hi = exact.forward_reference(x, x_exp, gamma.q, gamma.exp, beta.q, beta.exp, out_bits,
                                     y.exp, eps_log2)
    assert ((lo <= y.q) & (y.q <= hi)).all(), "forward code off by more than 1/2 + E"
    ranged = x.dtype == np.int16 or out_exp is None
    for col, key in STAT_COLUMNS + (RANGE_COLUMNS if ranged else ()):
        np.testing.assert_array_equal(cache.stats[:, col], stats[key], err_msg=key)
    np.testing.assert_array_equal(cache.stats[:, ST_DEV],
                                  [exact.Channel.of(r).dev for r in np.moveaxis(x, 1, 0)])
    return y, cache, stats


def check_backward(x, dy, gamma, cache, stats, dx_bits, dx_exp, eps_log2=None, x_exp=None,
                   dy_exp=-14, parallel=True, within_contract=True):
    """Kernel == oracle bit for bit, and (``within_contract``: amplification
    a' = |K_b| m (max g - min g) <= 2**23, always true for dx_exp=None) within 1 LSB of float64
    equation (20)."""
    x_exp = x_exp_of(x) if x_exp is None else x_exp
    dx, dgamma, dbeta = l1bn_backward(QTensor(dy, dy_exp), cache, dx_bits=dx_bits,
                                      dx_exp=dx_exp, parallel=parallel)
    dx_or, dx_exp_or, dg_or, db_or = oracle.l1bn_backward_oracle(
        x, dy, stats, gamma.q, gamma.exp, x_exp, dy_exp, dx_bits, dx_exp, dgamma.exp)
    np.testing.assert_array_equal(dx.q, dx_or)
    assert dx.q.dtype == (np.int8 if dx_bits <= 8 else np.int16)
    assert dx.exp == dx_exp_or and (dx_exp is None or dx.exp == dx_exp)
    np.testing.assert_array_equal(dgamma.q, dg_or)
    np.testing.assert_array_equal(dbeta.q, db_or)
    dx_f, dg_f, db_f = oracle.l1bn_backward_float64(x, x_exp, dy, dy_exp, gamma.q, gamma.exp,
                                                    dx_bits, dx.exp, eps_log2)
    if within_contract:
        assert np.abs(dx.q.astype(np.int64) - dx_f).max(initial=0) <= 1
    else:  # far outside (a' of 2**30 and more): the sign of every saturated code is right
        sat = np.abs(dx_f) == int(qmax(dx_bits))
        assert (np.sign(dx.q[sat]) == np.sign(dx_f[sat])).all()
    # within 1/2 + E of exact rationals wherever section 12 promises E (a' <= 2**24)
    lo, hi, promised = exact.backward_reference(x, dy, x_exp, dy_exp, gamma.q, gamma.exp,
                                                dx_bits, dx.exp, eps_log2)
    assert ((lo <= dx.q) & (dx.q <= hi)).all(), "dx code off by more than 1/2 + E"
    assert promised.all() or not within_contract or dx_exp is not None
    # dgamma: relative error below 8.5 * 2**-30 plus half a code (docs, section 5)
    lo, hi = exact.dgamma_reference(x, dy, x_exp, dy_exp, dgamma.exp, eps_log2)
    assert ((lo <= dgamma.q) & (dgamma.q <= hi)).all(), "dgamma off by more than its bound"
    np.testing.assert_array_equal(dbeta.value(), db_f)
    return dx


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("in_bits", [10, 12, 16])
@pytest.mark.parametrize("out_bits", [8, 12, 16])
def test_forward_backward_match_oracle_and_float64(shape, in_bits, out_bits):
    """int16 x and dy: every code equals the oracle and is within 1 LSB of float64, with the
    exponents given and chosen from the range."""
    x, gamma, beta, dy = make_case(shape, in_bits, in_bits, seed=sum(shape) + in_bits + out_bits)
    out_exp = 3 - (out_bits - 1)
    _, cache, stats = check_forward(x, gamma, beta, out_bits, out_exp)
    check_backward(x, dy, gamma, cache, stats, out_bits, out_exp + 1)
    _, cache, stats = check_forward(x, gamma, beta, out_bits, None)
    check_backward(x, dy, gamma, cache, stats, out_bits, None)


@pytest.mark.parametrize("x_bits, g_bits", [(8, 16), (16, 8), (4, 12), (12, 4), (8, 10)])
@pytest.mark.parametrize("out_bits", [8, 16])
def test_mixed_widths(x_bits, g_bits, out_bits):
    """x and dy widths are independent: int8 x with int16 dy and int16 x with int8 dy."""
    x, gamma, beta, dy = make_case((32, 3, 3, 3), x_bits, g_bits, seed=x_bits * 17 + g_bits)
    for out_exp, dx_exp in ((3 - (out_bits - 1), 4 - (out_bits - 1)), (None, None)):
        _, cache, stats = check_forward(x, gamma, beta, out_bits, out_exp)
        check_backward(x, dy, gamma, cache, stats, out_bits, dx_exp,
                       dy_exp=-14 if g_bits > 8 else -6)


@pytest.mark.parametrize("eps_log2", [-20, -8, 0])
def test_epsilon_matches_oracle_and_float64(eps_log2):
    """With epsilon = 2**eps_log2 (real units) results still match oracle and float64."""
    x, gamma, beta, dy = make_case((32, 4, 3, 3), seed=-eps_log2)
    _, cache, stats = check_forward(x, gamma, beta, 16, -12, eps_log2)
    check_backward(x, dy, gamma, cache, stats, 16, -12, eps_log2)


@pytest.mark.parametrize("value", [-32768, -32767, 0, 5, 32767])
def test_constant_channel_outputs_beta(value):
    """A channel with deviation 0 outputs round(beta) and passes back no error (eps = 0); with
    epsilon it divides by epsilon alone."""
    x, gamma, beta, dy = make_case((8, 3, 4, 4), seed=1)
    x[:, 1] = value
    y, cache, stats = check_forward(x, gamma, beta, 16, -12)
    want = np.clip(np.floor(beta.q[1] * 2.0 ** (beta.exp + 12) + 0.5), -32767, 32767)
    assert (y.q[:, 1] == want).all()
    dx = check_backward(x, dy, gamma, cache, stats, 16, -12)
    assert (dx.q[:, 1] == 0).all()
    _, cache, stats = check_forward(x, gamma, beta, 16, -12, eps_log2=-10)
    check_backward(x, dy, gamma, cache, stats, 16, -12, eps_log2=-10)


@pytest.mark.parametrize("pattern", ["halves", "halves_min", "one_outlier", "all_max",
                                     "all_min", "two_levels", "mean_off_centre"])
@pytest.mark.parametrize("dy_pattern", ["alternating", "aligned", "min_code"])
def test_extreme_codes(pattern, dy_pattern):
    """Codes at +-32767 and -32768, and near-constant channels far from 0, stay oracle-exact and
    within 1 LSB; -32768 never overflows. (dx_exp=-12 puts near-constant channels far outside the
    backward's 1-LSB condition, a' up to 2**34: there only oracle-exactness and the signs of
    saturated codes are checked.)"""
    x, gamma, beta, dy = make_case((32, 3, 4, 4), seed=3)
    flat = x.reshape(32, 3, -1)
    if pattern == "halves":
        flat[:16], flat[16:] = -32767, 32767
    elif pattern == "halves_min":
        flat[:16], flat[16:] = -32768, 32767
    elif pattern == "one_outlier":
        flat[:] = -32768
        flat[5, :, 3] = 32767
    elif pattern == "all_max":
        flat[:] = 32767
        flat[0, 0, 0] = 32766
    elif pattern == "all_min":
        flat[:] = -32768
        flat[0, :, 0] = -32767
    elif pattern == "two_levels":
        flat[:] = np.where(np.arange(16) % 3 == 0, 30000, 30001)
    else:
        flat[:] = np.where(np.arange(16) % 5 == 0, -20000, 29000)
    mean = flat.reshape(32, 3, -1).astype(np.int64).mean(axis=(0, 2), keepdims=True)
    sign = np.sign(flat.astype(np.int64) - mean).reshape(x.shape)
    if dy_pattern == "alternating":
        dy[:] = np.where(np.arange(dy.size).reshape(dy.shape) % 2, 32767, -32767)
    elif dy_pattern == "aligned":   # exact dx is zero: the offsets cancel the slope
        dy[:] = np.where(sign > 0, 32767, np.where(sign < 0, -32767, 0))
    else:
        dy[:] = np.where(np.arange(dy.size).reshape(dy.shape) % 3, -32768, 32767)
    for out_exp, dx_exp in ((-12, -12), (None, None)):
        _, cache, stats = check_forward(x, gamma, beta, 16, out_exp)
        check_backward(x, dy, gamma, cache, stats, 16, dx_exp,
                       within_contract=dx_exp is None or pattern in ("halves", "halves_min"))
        check_backward(x, dy, gamma, cache, stats, 8, None)


def test_gamma_zero_and_extreme_affine():
    """gamma = 0 gives beta; gamma = +-(2**31 - 1) saturates without overflow."""
    x, gamma, beta, dy = make_case((16, 3, 3, 3), seed=4)
    gamma = QTensor(np.array([0, 2**31 - 1, -(2**31 - 1)], dtype=np.int32), -12)
    for bits in (8, 16):
        _, cache, stats = check_forward(x, gamma, beta, bits, 3 - (bits - 1))
        check_backward(x, dy, gamma, cache, stats, bits, 3 - (bits - 1))


@pytest.mark.parametrize("m", [1 << 20, M_MAX])
def test_largest_m_supported(m):
    """m = 2**20 and m = M_MAX (one channel, skewed, with -32768, dy aligned with the signs so
    the exact dx nearly cancels): every accumulator is exact, the results oracle-exact and within
    1 LSB."""
    rng = np.random.default_rng(5)
    x = rng.integers(-32767, 32768, size=(m, 1), dtype=np.int16)
    x[: m // 2] = 32767
    x[7] = -32768
    dy = np.where(x > 0, 32767, -32767).astype(np.int16)
    dy[5] = -32768
    dy[m // 2 + 1::3] = 123
    gamma, beta = QTensor(np.array([5000], np.int32), -12), QTensor(np.array([77], np.int32), -12)
    y, cache, stats = check_forward(x, gamma, beta, 16, None, x_exp=-15)
    check_backward(x, dy, gamma, cache, stats, 16, None, x_exp=-15, dy_exp=-15)
    check_backward(x, dy, gamma, cache, stats, 8, None, x_exp=-15, dy_exp=-15)


def test_clamp_window_keeps_int64_exact():
    """A steep slope on a large channel: |A*(x - c)| would reach 2**64 without the clamp window;
    with it the codes equal the (unbounded-integer) oracle and float64 within 1 LSB."""
    m = 1 << 20
    rng = np.random.default_rng(16)
    x = np.zeros((m, 1), np.int16)
    x[:64, 0] = rng.integers(-3, 4, 64)
    x[100], x[200] = 32767, -32768
    dy = rng.integers(-32767, 32768, size=(m, 1), dtype=np.int16)
    gamma = QTensor(np.array([1 << 10], np.int32), -12)
    beta = QTensor(np.array([-5], np.int32), -12)
    y, cache, stats = check_forward(x, gamma, beta, 16, -12, x_exp=-15)
    check_backward(x, dy, gamma, cache, stats, 16, None, x_exp=-15, dy_exp=-15)
    lo, hi = int(stats["min"][0]), int(stats["max"][0])
    a, b, c, sh = forward_params16(stats["sum"][0], m, stats["t_hi"][0] - 1, stats["rmant"][0],
                                   stats["rexp"][0], 1 << 10, 0, -5, 0, lo, hi)
    d_max = max(abs(lo - c), abs(hi - c))
    lanes32, window = centred_lanes(a, abs(b), d_max, sh, 32767)
    assert not lanes32 and abs(a) * d_max + abs(b) >= 1 << 63 and 0 < window < d_max
    assert (y.q[100] == 32767).all() and (y.q[200] == -32767).all()


def test_m_beyond_limit_raises():
    """More than M_MAX values per channel is refused with the limit in the message."""
    x = np.zeros((M_MAX // 1024 + 1, 1, 32, 32), dtype=np.int16)
    gamma, beta = QTensor(np.ones(1, np.int32), 0), QTensor(np.zeros(1, np.int32), 0)
    with pytest.raises(ValueError, match=f"int16 L1BN kernels support at most {M_MAX}"):
        l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=16, out_exp=-4)


@pytest.mark.parametrize("x_bits, g_bits", [(16, 16), (8, 16), (16, 8)])
@pytest.mark.parametrize("shape", [(64, 7), (16, 9, 6, 6)])
def test_serial_and_parallel_identical_and_repeatable(x_bits, g_bits, shape):
    """Serial and parallel drivers, and repeated runs, give identical results."""
    x, gamma, beta, dy = make_case(shape, x_bits, g_bits, seed=6)
    outs = []
    for parallel in (False, True, True):
        for out_exp in (-12, None):
            y, cache = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=16, out_exp=out_exp,
                                    parallel=parallel)
            dx, dg, db = l1bn_backward(QTensor(dy, -14), cache, dx_bits=12,
                                       dx_exp=out_exp and -8, parallel=parallel)
            outs.append((y.q, y.exp, cache.stats, dx.q, dx.exp, dg.q, db.q))
    for k, other in enumerate(outs):  # serial (given, range), then parallel twice
        for a, b in zip(outs[k % 2], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(64, 5), (16, 6, 6, 6)])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_exponents_chosen_from_the_range(shape, bits):
    """out_exp/dx_exp=None on int16 codes: oracle-exact, within 1 LSB, y's largest code in the top
    half of the format, and at most the few values rounding up to 2**(bits-1) saturate."""
    x, gamma, beta, dy = make_case(shape, seed=bits)
    y, cache, stats = check_forward(x, gamma, beta, bits, None)
    dx = check_backward(x, dy, gamma, cache, stats, bits, None)
    q = (1 << (bits - 1)) - 1
    assert (q + 1) // 2 <= int(np.abs(y.q.astype(np.int64)).max()) <= q
    for t in (y.q, dx.q):
        assert np.mean(np.abs(t.astype(np.int64)) == q) < 0.01


@pytest.mark.parametrize("shape", [(64, 5), (16, 6, 6, 6)])
def test_range_exponent_path_equals_given_exponent_path(shape):
    """The two-phase path (exponent from the range) equals the one-region path given it."""
    x, gamma, beta, dy = make_case(shape, seed=14)
    y_auto, cache_auto = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=12)
    y_given, cache_given = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=12,
                                        out_exp=y_auto.exp)
    np.testing.assert_array_equal(y_auto.q, y_given.q)
    np.testing.assert_array_equal(cache_auto.stats, cache_given.stats)
    dx_auto, dg_auto, db_auto = l1bn_backward(QTensor(dy, -14), cache_auto, dx_bits=12)
    dx_given, dg_given, db_given = l1bn_backward(QTensor(dy, -14), cache_given, dx_bits=12,
                                                 dx_exp=dx_auto.exp)
    for a, b in ((dx_auto, dx_given), (dg_auto, dg_given), (db_auto, db_given)):
        assert a.exp == b.exp
        np.testing.assert_array_equal(a.q, b.q)


def test_both_centred_forms_and_lanes_are_exercised():
    """The int32 (narrow) and int64 (wide) centred forms both run, forward and backward: a small
    gain keeps channel 0 narrow, a full one makes channel 1 wide."""
    from qkernels.l1bn import _centred_lanes_of

    x, _, beta, dy = make_case((64, 2, 4, 4), x_bits=12, g_bits=12, seed=13)
    gamma = QTensor(np.array([40, 5000], np.int32), -12)
    y, cache, stats = check_forward(x, gamma, beta, 16, -12)
    dx = check_backward(x, dy, gamma, cache, stats, 16, None)
    m = 64 * 16
    inv_m = dy_recip(*dy_norm(m, 0))
    g_rows = np.moveaxis(dy, 1, 0).reshape(2, -1).astype(np.int64)
    x_rows = np.moveaxis(x, 1, 0).reshape(2, -1).astype(np.int64)
    fwd, bwd = [], []
    for c in range(2):
        s, t, rm, re = (int(stats[k][c]) for k in ("sum", "t_hi", "rmant", "rexp"))
        lo, hi = int(stats["min"][c]), int(stats["max"][c])
        a, b, cen, sh = forward_params16(s, m, t - 1, rm, re, int(gamma.q[c]), 0,
                                         int(beta.q[c]), 0, lo, hi)
        fwd.append(bool(_centred_lanes_of(a, np.array([b]), np.array([cen]), sh, 32767, lo,
                                          hi)[0]))
        g = g_rows[c]
        a, b, cen, sh = backward_params16(s, m, t - 1, int(stats["sign_sum"][c]), rm, re,
                                          int(g.sum()), int((g * x_rows[c]).sum()),
                                          int(g.min()), int(g.max()), int(gamma.q[c]),
                                          -12 - 14 + 12 - dx.exp, *inv_m)
        bwd.append(bool(_centred_lanes_of(a, b, cen, sh, 32767, int(g.min()), int(g.max()))[0]))
    assert fwd == [True, False] and bwd == [True, False]


# --- running statistics and folded inference --------------------------------------------------


def test_running_statistics_follow_momentum():
    """Running mean and L1 deviation of int16 codes follow the momentum update in RUN_EXP codes
    (within one code of the exact-rational oracle)."""
    x, gamma, beta, _ = make_case((32, 4, 5, 5), seed=7)
    _, cache = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=16, out_exp=-12)
    rng = np.random.default_rng(8)
    mean0 = rng.integers(-(1 << 26), 1 << 26, 4).astype(np.int64)
    dev0 = rng.integers(0, 1 << 26, 4).astype(np.int64)
    momentum_q = round(0.1 * (1 << MOMENTUM_BITS))
    mean, dev = mean0.copy(), dev0.copy()
    l1bn_update_running(mean, dev, cache, momentum_q)
    stats = {"sum": cache.stats[:, ST_SUM], "dev": cache.stats[:, 1]}
    want_mean, want_dev = oracle.running_update_oracle(mean0, dev0, stats, 32 * 25, -12,
                                                       momentum_q)
    assert np.abs(mean - want_mean).max() <= 1
    assert np.abs(dev - want_dev).max() <= 1


def test_running_statistics_saturate_without_overflow():
    """int16 codes at a large exponent: the running statistics saturate at RUN_LIMIT."""
    from qkernels.l1bn import RUN_LIMIT

    x = np.full((4, 1), 32767, np.int16)
    x[0] = -32768
    gamma, beta = QTensor(np.ones(1, np.int32), 0), QTensor(np.zeros(1, np.int32), 0)
    _, cache = l1bn_forward(QTensor(x, 30), gamma, beta, out_bits=16, out_exp=-4)
    mean = np.array([-(1 << 62)], np.int64)
    dev = np.array([1 << 62], np.int64)
    l1bn_update_running(mean, dev, cache, 1 << MOMENTUM_BITS)
    assert mean[0] == RUN_LIMIT and dev[0] == RUN_LIMIT


@pytest.mark.parametrize("shape", [(64, 5), (8, 6, 4, 4)])
@pytest.mark.parametrize("eps_log2", [None, -16])
@pytest.mark.parametrize("x_bits, out_bits", [(12, 8), (16, 16)])
def test_folded_inference_matches_oracle_and_float64(shape, eps_log2, x_bits, out_bits):
    """A fold for 16-bit codes is one multiplier, offset and shift per channel, oracle-exact and
    within 1 LSB of float64 on int16 codes."""
    x, gamma, beta, _ = make_case(shape, x_bits, seed=9)
    rng = np.random.default_rng(10)
    c = shape[1]
    run_mean = (rng.uniform(-3, 3, c) * 2.0**-RUN_EXP).astype(np.int64)
    run_dev = (rng.uniform(0.2, 4, c) * 2.0**-RUN_EXP).astype(np.int64)
    out_exp = 3 - (out_bits - 1)
    x_exp = -12 if x_bits == 16 else -8
    folded = l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=x_exp, out_bits=out_bits,
                       out_exp=out_exp, eps_log2=eps_log2, x_bits=x_bits)
    assert folded.shape == (c, 3) and folded.dtype == np.int64
    y = l1bn_inference(QTensor(x, x_exp), folded, out_bits=out_bits, out_exp=out_exp)
    assert y.q.dtype == (np.int8 if out_bits <= 8 else np.int16)
    want = oracle.l1bn_inference_oracle(x, x_exp, gamma.q, gamma.exp, beta.q, beta.exp,
                                        run_mean, run_dev, out_bits, out_exp, eps_log2)
    np.testing.assert_array_equal(y.q, want)
    np.testing.assert_array_equal(
        l1bn_inference(QTensor(x, x_exp), folded, out_bits=out_bits, out_exp=out_exp,
                       parallel=False).q, y.q)
    xr = np.ldexp(x.astype(np.float64), x_exp)
    shape_c = (1, c) + (1,) * (x.ndim - 2)
    eps = 0.0 if eps_log2 is None else 2.0**eps_log2
    y_f = (gamma.value().reshape(shape_c) * (xr - (run_mean * 2.0**RUN_EXP).reshape(shape_c))
           / ((run_dev * 2.0**RUN_EXP).reshape(shape_c) + eps) + beta.value().reshape(shape_c))
    q = int(qmax(out_bits))
    y_f = np.clip(np.floor(np.ldexp(y_f, -out_exp) + 0.5), -q, q)
    assert np.abs(y.q - y_f).max() <= 1
    # the same fold applies to int8 codes too (its rows are safe for any |x| <= 2**15)
    x8 = (x >> 8).astype(np.int8)
    rows = [np.asarray(r, dtype=object).reshape(shape_c) for r in folded.T]
    want8 = np.clip((rows[0] * x8.astype(object) + rows[1]) >> rows[2], -q, q).astype(np.int64)
    y8 = l1bn_inference(QTensor(x8, x_exp + 8), folded, out_bits=out_bits, out_exp=out_exp)
    np.testing.assert_array_equal(y8.q, want8)


def test_inference_with_batch_statistics_equals_training_forward():
    """Folding the batch's own statistics reproduces the int16 training forward within 1 LSB."""
    x, gamma, beta, _ = make_case((16, 3, 4, 4), seed=11)
    y_train, cache = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=16, out_exp=-12)
    run_mean, run_dev = np.zeros(3, np.int64), np.zeros(3, np.int64)
    l1bn_update_running(run_mean, run_dev, cache, 1 << MOMENTUM_BITS)
    folded = l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=-12, out_bits=16, out_exp=-12,
                       x_bits=16)
    y_inf = l1bn_inference(QTensor(x, -12), folded, out_bits=16, out_exp=-12)
    assert np.abs(y_inf.q.astype(int) - y_train.q).max() <= 1


def test_int8_fold_refused_on_int16_codes():
    """A fold made for int8 codes can overflow on int16 codes: refused, naming folded."""
    x, gamma, beta, _ = make_case((16, 3), seed=12)
    run_mean, run_dev = np.zeros(3, np.int64), np.full(3, 1 << 10, np.int64)  # a steep slope
    folded = l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=-12, out_bits=16, out_exp=-12)
    with pytest.raises(ValueError, match="folded.*x_bits"):
        l1bn_inference(QTensor(x, -12), folded, out_bits=16, out_exp=-12)


# --- argument checking ------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    """Wrong dtypes, shapes and widths raise TypeError/ValueError naming the argument."""
    x, gamma, beta, dy = make_case((8, 3, 2, 2), seed=12)
    with pytest.raises(TypeError, match="x.q"):
        l1bn_forward(QTensor(x.astype(np.int32), -4), gamma, beta, out_bits=16)
    with pytest.raises(TypeError, match="x.q"):
        l1bn_forward(QTensor(x.astype(np.uint16), -4), gamma, beta, out_bits=16)
    _, cache = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=16)
    with pytest.raises(TypeError, match="dy.q"):
        l1bn_backward(QTensor(dy.astype(np.uint16), -6), cache, dx_bits=16)
    with pytest.raises(ValueError, match="dy.q"):
        l1bn_backward(QTensor(dy[:2], -6), cache, dx_bits=16)
    with pytest.raises(TypeError, match="out"):
        l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=16, out=np.empty(x.shape, np.int8))
    with pytest.raises(ValueError, match="x_bits"):
        l1bn_fold(gamma, beta, np.zeros(3, np.int64), np.ones(3, np.int64), x_exp=-12,
                  out_bits=16, out_exp=-12, x_bits=17)
    with pytest.raises(TypeError, match="x.q"):
        l1bn_inference(QTensor(x.astype(np.int32), -12), np.zeros((3, 3), np.int64),
                       out_bits=16, out_exp=-12)


def test_out_buffers_receive_the_same_codes():
    """Caller-owned out= buffers get the same codes from the 16-bit kernels."""
    x, gamma, beta, dy = make_case((8, 6, 4, 4), seed=12)
    y, cache = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=12, out_exp=-8)
    dx, _, _ = l1bn_backward(QTensor(dy, -14), cache, dx_bits=8, dx_exp=-3)
    y_buf = np.full(x.shape, 99, dtype=np.int16)
    dx_buf = np.full(x.shape, 99, dtype=np.int8)
    y2, cache2 = l1bn_forward(QTensor(x, -12), gamma, beta, out_bits=12, out_exp=-8, out=y_buf)
    dx2, _, _ = l1bn_backward(QTensor(dy, -14), cache2, dx_bits=8, dx_exp=-3, out=dx_buf)
    assert y2.q is y_buf and dx2.q is dx_buf
    np.testing.assert_array_equal(y_buf, y.q)
    np.testing.assert_array_equal(dx_buf, dx.q)


# --- the two-limb helpers and exact rationals ------------------------------------------------


def test_two_limb_helpers_match_python_integers():
    """wide_* and grad_p are exact: they equal Python integer arithmetic, extremes included."""
    rng = np.random.default_rng(15)
    big = [0, 1, -1, 2**31, -2**31, 2**62 - 1, -2**62, 2**63 - 1, -2**63]
    a_vals = big + [int(v) for v in rng.integers(-2**63, 2**63 - 1, 200, dtype=np.int64)]
    b_vals = [0, 1, -1, 2**31, -2**31, 2**31 - 1] + [int(v) for v in
                                                      rng.integers(-2**31, 2**31, 200)]

    def value(h, lo):
        assert 0 <= lo < 2**32
        return int(h) * 2**32 + int(lo)

    for a, b in zip(a_vals, b_vals * 2):
        assert value(*wide_mul(a, b)) == a * b
        assert value(*wide_from(a)) == a
        assert value(*wide_neg(*wide_from(a))) == -a
        assert value(*wide_add(*wide_from(a), *wide_mul(a, b))) == a + a * b
        p = a * b
        mant, exp = wide_dy_norm(*wide_mul(a, b), -3)
        if p == 0:
            assert mant == 0
        else:
            n = abs(p).bit_length()
            want = abs(p) >> (n - 31) if n > 31 else abs(p) << (31 - n)
            assert (mant, exp) == ((want if p > 0 else -want), n - 31 - 3)
        lim = 2**61
        assert wide_sat(*wide_mul(a, b), lim) == max(-lim, min(lim, p))
    for mant in (2**30, -2**30, 2**31 - 1, -(2**31 - 1), 12345):
        for e, sh in ((-40, 8), (-5, 40), (20, 40), (0, 0), (-31, 30), (40, 50)):
            s = e + sh
            want = (mant * 2**s if s >= 0 else (mant + 2**(-s - 1)) >> -s)
            assert value(*wide_to_fixed(mant, e, sh)) == max(-2**92, min(2**92, want))
    # P at the extremes of M_MAX and 16-bit codes: up to 2**77
    for s, m, sg, sgx in ((32767 * M_MAX, M_MAX, -32768 * M_MAX, -(2**30) * M_MAX),
                          (-32768 * M_MAX + 1, M_MAX, 32767 * M_MAX, 2**30 * M_MAX - 5),
                          (12345, 100, -999, 31337), (0, 2, 0, 0)):
        t = s // m
        assert value(*grad_p(s, m, t, sg, sgx)) == m * sgx - s * sg


@pytest.mark.parametrize("seed", range(6))
def test_pre_rounding_values_are_close_to_exact_rationals(seed):
    """The kernels' value before rounding, (A*(x - c) + B)/2**sh - 1/2, is within 0.1 LSB of the
    exact rational result of equations (10)-(11) and (20) for every unsaturated output (the
    section 5 lemma then gives 1 LSB against float64), on small channels with 16-bit codes,
    near-constant and sign-aligned data included, exponents from the range."""
    rng = np.random.default_rng(100 + seed)
    worst = 0.0
    for _ in range(15):
        m = int(rng.choice([2, 3, 16, 60]))
        q_in = int(qmax(int(rng.choice([10, 16]))))
        kind = rng.integers(0, 3)
        x = rng.integers(-q_in, q_in + 1, m)
        if kind == 1:
            x[:] = rng.integers(-q_in, q_in)
            x[rng.integers(0, m)] += 1
        g = rng.integers(-32767, 32768, m)
        if kind == 2:
            g = np.sign(x - x.mean()).astype(np.int64) * 30000 + rng.integers(-3, 4, m)
        x = x.reshape(m, 1).astype(np.int16)
        g = g.reshape(m, 1).astype(np.int16)
        gq, bq = int(rng.integers(1, 1 << 14)), int(rng.integers(-4096, 4096))
        eps = None if rng.random() < 0.5 else int(rng.integers(-24, -2))
        x_exp, g_exp, out_bits = -12, -14, int(rng.choice([8, 12, 16]))
        y, cache = l1bn_forward(QTensor(x, x_exp), QTensor(np.array([gq], np.int32), -12),
                                QTensor(np.array([bq], np.int32), -12), out_bits=out_bits,
                                eps_log2=eps)
        dx, _, _ = l1bn_backward(QTensor(g, g_exp), cache, dx_bits=out_bits)
        q = int(qmax(out_bits))
        st_ = cache.stats[0]
        s, t, rm, re, ss = int(st_[0]), int(st_[4]) - 1, int(st_[5]), int(st_[6]), int(st_[2])
        xs, gs = x[:, 0].astype(np.int64), g[:, 0].astype(np.int64)
        ch = exact.Channel.of(xs)
        eps_shift = None if eps is None else eps - x_exp
        a, b, c, sh = forward_params16(s, m, t, rm, re, gq, -12 - y.exp, bq, -12 - y.exp,
                                       int(xs.min()), int(xs.max()))
        for v in ch.values:
            want = exact.forward_value(ch, v, gq, -12 - y.exp, bq, -12 - y.exp, eps_shift)
            got = Fraction(a * (v - c) + b, 2**sh) - Fraction(1, 2)
            if abs(want) <= q + Fraction(1, 2):
                worst = max(worst, abs(float(got - want)))
        if ch.d_eps(eps_shift) == 0:
            continue
        inv_m = dy_recip(*dy_norm(m, 0))
        k_shift = -12 + g_exp - x_exp - dx.exp
        a, b, c, sh = backward_params16(s, m, t, ss, rm, re, int(gs.sum()), int((gs * xs).sum()),
                                        int(gs.min()), int(gs.max()), gq, k_shift, *inv_m)
        gc = exact.GradChannel.of(ch, xs, gs)
        for gv, sv in gc.pairs:
            want = exact.backward_value(ch, gc, gv, sv, gq, k_shift, eps_shift)
            got = Fraction(a * (gv - int(c[sv + 1])) + int(b[sv + 1]), 2**sh) - Fraction(1, 2)
            if abs(want) <= q + Fraction(1, 2):
                worst = max(worst, abs(float(got - want)))
    assert worst < 0.1


# --- property test ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 24), c=st.integers(1, 4), hw=st.integers(1, 5),
       x_bits=st.integers(2, 16), g_bits=st.integers(9, 16), swap=st.booleans(),
       out_bits=st.integers(2, 16), seed=st.integers(0, 2**16),
       gamma_scale=st.sampled_from([0.01, 1.0, 30.0]), x_exp=st.integers(-18, 4),
       eps_log2=st.one_of(st.none(), st.integers(-24, 2)), from_range=st.booleans())
def test_property_random_cases(n, c, hw, x_bits, g_bits, swap, out_bits, seed, gamma_scale,
                               x_exp, eps_log2, from_range):
    """Any shape, widths (at least one of x, dy 16-bit), scales, epsilon and exponents:
    oracle-exact and within 1 LSB of float64."""
    if swap:
        x_bits, g_bits = g_bits, x_bits
    x, gamma, beta, dy = make_case((n, c, hw, hw), x_bits, g_bits, seed, gamma_scale)
    out_exp = None if from_range else 3 - (out_bits - 1)
    _, cache, stats = check_forward(x, gamma, beta, out_bits, out_exp, eps_log2, x_exp=x_exp)
    check_backward(x, dy, gamma, cache, stats, out_bits, None if from_range else out_exp - 3,
                   eps_log2, x_exp=x_exp, dy_exp=-14 if g_bits > 8 else -6)
