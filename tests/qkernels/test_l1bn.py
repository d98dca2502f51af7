"""The int8 L1BN kernels against the numpy int64 oracle (bit for bit) and float64 (1 LSB); the
16-bit kernels (int16 x or dy) are tested in test_l1bn16.py."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkernels import QTensor, l1bn_backward, l1bn_fold, l1bn_forward, l1bn_inference
from qkernels import exact, l1bn_update_running, oracle
from qkernels.fixedpoint import M_MAX, MOMENTUM_BITS, RUN_EXP, qmax
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
)

SHAPES = [(2, 3), (64, 5), (4, 3, 5, 5), (16, 6, 8, 8), (3, 2, 1, 7)]
#: Every statistics column against the oracle's own statistics (the range columns only where
#: the exponent comes from the range: the one-region forward does not track them).
STAT_COLUMNS = ((ST_SUM, "sum"), (ST_DEV, "dev"), (ST_SIGNSUM, "sign_sum"), (ST_TLO, "t_lo"),
                (ST_THI, "t_hi"), (ST_RMANT, "rmant"), (ST_REXP, "rexp"))
RANGE_COLUMNS = ((ST_MIN, "min"), (ST_MAX, "max"))


def make_case(shape, in_bits=8, out_bits=8, seed=0, gamma_scale=1.0, beta_scale=1.0):
    """Random codes and affine parameters; gamma/beta about +-1 in 2**-12 units."""
    rng = np.random.default_rng(seed)
    q = int(qmax(in_bits))
    x = rng.integers(-q, q + 1, size=shape, dtype=np.int8)
    n_channels = shape[1]
    gamma = (rng.uniform(-1.5, 1.5, n_channels) * gamma_scale * 4096).astype(np.int32)
    beta = (rng.uniform(-1, 1, n_channels) * beta_scale * 4096).astype(np.int32)
    dy = rng.integers(-127, 128, size=shape, dtype=np.int8)
    out_exp = 3 - (out_bits - 1)  # range about +-8
    return x, QTensor(gamma, -12), QTensor(beta, -12), dy, out_exp


def run_forward(x, gamma, beta, out_bits, out_exp, eps_log2=None, parallel=True, x_exp=-4):
    return l1bn_forward(QTensor(x, x_exp), gamma, beta, out_bits=out_bits, out_exp=out_exp,
                        eps_log2=eps_log2, parallel=parallel)


def check_forward(x, gamma, beta, out_bits, out_exp, eps_log2=None, x_exp=-4):
    """Kernel == oracle bit for bit, and within 1 LSB of float64 equations (10)-(11)."""
    y, cache = run_forward(x, gamma, beta, out_bits, out_exp, eps_log2, x_exp=x_exp)
    y_or, exp_or, stats = oracle.l1bn_forward_oracle(x, x_exp, gamma.q, gamma.exp, beta.q,
                                                     beta.exp, out_bits, out_exp, eps_log2)
    np.testing.assert_array_equal(y.q, y_or)
    assert y.q.dtype == (np.int8 if out_bits <= 8 else np.int16)
    assert y.exp == exp_or and (out_exp is None or y.exp == out_exp)
    y_f = oracle.l1bn_forward_float64(x, x_exp, gamma.q, gamma.exp, beta.q, beta.exp, out_bits,
                                      y.exp, eps_log2)
    assert np.abs(y.q.astype(np.int64) - y_f).max(initial=0) <= 1
    # within 1/2 + E of the exact rational value, E = 0.073 (docs section 5): a sub-LSB bias
    # fails here even where 1 LSB of float64 admits it
    lo, hi = exact.forward_reference(x, x_exp, gamma.q, gamma.exp, beta.q, beta.exp, out_bits,
                                     y.exp, eps_log2)
    assert ((lo <= y.q) & (y.q <= hi)).all(), "forward code off by more than 1/2 + E"
    for col, key in STAT_COLUMNS + (RANGE_COLUMNS if out_exp is None else ()):
        np.testing.assert_array_equal(cache.stats[:, col], stats[key], err_msg=key)
    np.testing.assert_array_equal(cache.stats[:, ST_DEV],
                                  [exact.Channel.of(r).dev for r in np.moveaxis(x, 1, 0)])
    return y, cache, stats


def check_backward(x, dy, gamma, cache, stats, dx_bits, dx_exp, eps_log2=None, x_exp=-4,
                   dy_exp=-6):
    """Kernel == oracle bit for bit, and within 1 LSB of float64 equation (20)."""
    dx, dgamma, dbeta = l1bn_backward(QTensor(dy, dy_exp), cache, dx_bits=dx_bits,
                                      dx_exp=dx_exp)
    dx_or, dx_exp_or, dg_or, db_or = oracle.l1bn_backward_oracle(
        x, dy, stats, gamma.q, gamma.exp, x_exp, dy_exp, dx_bits, dx_exp, dgamma.exp)
    np.testing.assert_array_equal(dx.q, dx_or)
    assert dx.exp == dx_exp_or and (dx_exp is None or dx.exp == dx_exp)
    np.testing.assert_array_equal(dgamma.q, dg_or)
    np.testing.assert_array_equal(dbeta.q, db_or)
    dx_f, dg_f, db_f = oracle.l1bn_backward_float64(x, x_exp, dy, dy_exp, gamma.q, gamma.exp,
                                                    dx_bits, dx.exp, eps_log2)
    assert np.abs(dx.q.astype(np.int64) - dx_f).max(initial=0) <= 1
    # within 1/2 + E of exact rationals wherever the docs promise E (section 5)
    lo, hi, promised = exact.backward_reference(x, dy, x_exp, dy_exp, gamma.q, gamma.exp,
                                                dx_bits, dx.exp, eps_log2)
    assert ((lo <= dx.q) & (dx.q <= hi)).all(), "dx code off by more than 1/2 + E"
    assert promised.all() or dx_exp is not None, "a range-chosen dx_exp must keep a <= 2**23"
    lo, hi = exact.dgamma_reference(x, dy, x_exp, dy_exp, dgamma.exp, eps_log2)
    assert ((lo <= dgamma.q) & (dgamma.q <= hi)).all(), "dgamma off by more than its bound"
    np.testing.assert_array_equal(dbeta.value(), db_f)
    return dx


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("in_bits", [2, 4, 8])
@pytest.mark.parametrize("out_bits", [2, 4, 8, 16])
def test_forward_backward_match_oracle_and_float64(shape, in_bits, out_bits):
    """Every output code equals the oracle and is within 1 LSB of the float64 equations."""
    x, gamma, beta, dy, out_exp = make_case(shape, in_bits, out_bits, seed=sum(shape) + in_bits)
    _, cache, stats = check_forward(x, gamma, beta, out_bits, out_exp)
    check_backward(x, dy, gamma, cache, stats, out_bits, out_exp - 2)


@pytest.mark.parametrize("eps_log2", [-20, -8, 0])
def test_epsilon_matches_oracle_and_float64(eps_log2):
    """With epsilon = 2**eps_log2 (real units) results still match oracle and float64."""
    x, gamma, beta, dy, out_exp = make_case((32, 4, 3, 3), seed=-eps_log2)
    _, cache, stats = check_forward(x, gamma, beta, 8, out_exp, eps_log2)
    check_backward(x, dy, gamma, cache, stats, 8, -6, eps_log2)


def test_single_value_per_channel_raises():
    """N*H*W = 1 cannot be normalized in training mode: a clear ValueError, as in torch."""
    x, gamma, beta, _, _ = make_case((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run_forward(x, gamma, beta, 8, -4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run_forward(x[:, :, 0, 0], gamma, beta, 8, -4)


@pytest.mark.parametrize("value", [-127, 0, 5, 127])
def test_constant_channel_outputs_beta(value):
    """A channel with deviation 0 outputs round(beta) and passes back no error (eps = 0)."""
    x, gamma, beta, dy, _ = make_case((8, 3, 4, 4), seed=1)
    x[:, 1] = value
    y, cache, stats = check_forward(x, gamma, beta, 8, -4)
    want = np.clip(np.floor(beta.q[1] * 2.0 ** (beta.exp + 4) + 0.5), -127, 127)
    assert (y.q[:, 1] == want).all()
    dx = check_backward(x, dy, gamma, cache, stats, 8, -6)
    assert (dx.q[:, 1] == 0).all()


def test_constant_channel_with_epsilon_is_finite():
    """With epsilon a constant channel divides by epsilon alone and still matches float64."""
    x, gamma, beta, dy, _ = make_case((8, 2, 4, 4), seed=2)
    x[:, 0] = 9
    _, cache, stats = check_forward(x, gamma, beta, 8, -4, eps_log2=-10)
    check_backward(x, dy, gamma, cache, stats, 8, -6, eps_log2=-10)


@pytest.mark.parametrize("pattern", ["halves", "one_outlier", "all_max", "two_levels"])
def test_extreme_codes(pattern):
    """Codes at -127/127 and near-constant channels stay exact and within 1 LSB."""
    x, gamma, beta, dy, _ = make_case((32, 3, 4, 4), seed=3)
    flat = x.reshape(32, 3, -1)
    if pattern == "halves":
        flat[:16], flat[16:] = -127, 127
    elif pattern == "one_outlier":
        flat[:] = -127
        flat[5, :, 3] = 127
    elif pattern == "all_max":
        flat[:] = 127
        flat[0, 0, 0] = 126
    else:
        flat[:] = np.where(np.arange(16) % 3 == 0, 3, 4)
    dy[:] = np.where(np.arange(dy.size).reshape(dy.shape) % 2, 127, -127)
    _, cache, stats = check_forward(x, gamma, beta, 8, -4)
    check_backward(x, dy, gamma, cache, stats, 8, -6)


def test_gamma_zero_and_extreme_affine():
    """gamma = 0 gives beta; large gamma saturates without overflow."""
    x, gamma, beta, dy, _ = make_case((16, 3, 3, 3), seed=4)
    gamma = QTensor(np.array([0, 2**31 - 1, -(2**31 - 1)], dtype=np.int32), -12)
    _, cache, stats = check_forward(x, gamma, beta, 8, -4)
    check_backward(x, dy, gamma, cache, stats, 8, -6)


def test_largest_m_supported():
    """m = M_MAX (2**23) values per channel keeps every accumulator exact."""
    n = M_MAX // (64 * 64)
    rng = np.random.default_rng(5)
    x = rng.integers(-127, 128, size=(n, 1, 64, 64), dtype=np.int8)
    x[: n // 2] = 127  # a skewed channel maximises |S| and D
    gamma, beta = QTensor(np.array([5000], np.int32), -12), QTensor(np.array([77], np.int32), -12)
    y, cache, stats = check_forward(x, gamma, beta, 8, -4)
    dy = np.full_like(x, 127)
    dy[1::2] = -127
    check_backward(x, dy, gamma, cache, stats, 8, -6)


def test_m_beyond_limit_raises():
    """More than M_MAX values per channel is refused with the limit in the message."""
    x = np.zeros((M_MAX // 1024 + 1, 1, 32, 32), dtype=np.int8)
    gamma, beta = QTensor(np.ones(1, np.int32), 0), QTensor(np.zeros(1, np.int32), 0)
    with pytest.raises(ValueError, match=str(M_MAX)):
        run_forward(x, gamma, beta, 8, -4)


@pytest.mark.parametrize("shape", [(64, 7), (16, 9, 6, 6)])
def test_serial_and_parallel_identical_and_repeatable(shape):
    """Serial and parallel drivers, and repeated runs, give identical results."""
    x, gamma, beta, dy, out_exp = make_case(shape, seed=6)
    outs = []
    for parallel in (False, True, True):
        y, cache = run_forward(x, gamma, beta, 8, out_exp, parallel=parallel)
        dx, dg, db = l1bn_backward(QTensor(dy, -6), cache, dx_bits=8, dx_exp=-6,
                                   parallel=parallel)
        outs.append((y.q, cache.stats, dx.q, dg.q, db.q))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 24), c=st.integers(1, 4), hw=st.integers(1, 5),
       in_bits=st.integers(2, 8), out_bits=st.integers(2, 16), seed=st.integers(0, 2**16),
       gamma_scale=st.sampled_from([0.01, 1.0, 30.0]), x_exp=st.integers(-10, 4),
       eps_log2=st.one_of(st.none(), st.integers(-24, 2)))
def test_property_random_cases(n, c, hw, in_bits, out_bits, seed, gamma_scale, x_exp, eps_log2):
    """For any shape, widths, scales and epsilon: oracle-exact and within 1 LSB of float64."""
    x, gamma, beta, dy, out_exp = make_case((n, c, hw, hw), in_bits, out_bits, seed,
                                            gamma_scale=gamma_scale)
    _, cache, stats = check_forward(x, gamma, beta, out_bits, out_exp, eps_log2, x_exp=x_exp)
    check_backward(x, dy, gamma, cache, stats, out_bits, out_exp - 3, eps_log2, x_exp=x_exp)


def test_running_statistics_follow_momentum():
    """Running mean and L1 deviation follow new = old + momentum*(batch - old) in RUN_EXP codes."""
    x, gamma, beta, _, _ = make_case((32, 4, 5, 5), seed=7)
    _, cache = run_forward(x, gamma, beta, 8, -4)
    rng = np.random.default_rng(8)
    mean0 = rng.integers(-(1 << 26), 1 << 26, 4).astype(np.int64)
    dev0 = rng.integers(0, 1 << 26, 4).astype(np.int64)
    momentum_q = round(0.1 * (1 << MOMENTUM_BITS))
    mean, dev = mean0.copy(), dev0.copy()
    l1bn_update_running(mean, dev, cache, momentum_q)
    stats = {"sum": cache.stats[:, ST_SUM], "dev": cache.stats[:, 1]}
    want_mean, want_dev = oracle.running_update_oracle(mean0, dev0, stats, 32 * 25, -4,
                                                       momentum_q)
    # the batch statistics go through a dyadic 1/m (relative error < 2**-29): allow 1 code
    assert np.abs(mean - want_mean).max() <= 1
    assert np.abs(dev - want_dev).max() <= 1
    # and the real values are what the float formulas give
    xr = np.moveaxis(x.astype(np.float64) / 16, 1, 0).reshape(4, -1)
    mom = momentum_q / (1 << MOMENTUM_BITS)
    real_mean = (1 - mom) * mean0 * 2.0**RUN_EXP + mom * xr.mean(axis=1)
    np.testing.assert_allclose(mean * 2.0**RUN_EXP, real_mean, atol=2.0**RUN_EXP * 2)


@pytest.mark.parametrize("shape", [(64, 5), (8, 6, 4, 4)])
@pytest.mark.parametrize("eps_log2", [None, -16])
def test_folded_inference_matches_oracle_and_float64(shape, eps_log2):
    """Inference folds into one multiplier, offset and shift per channel, within 1 LSB."""
    x, gamma, beta, _, _ = make_case(shape, seed=9)
    rng = np.random.default_rng(10)
    c = shape[1]
    run_mean = (rng.uniform(-3, 3, c) * 2.0**-RUN_EXP).astype(np.int64)
    run_dev = (rng.uniform(0.2, 4, c) * 2.0**-RUN_EXP).astype(np.int64)
    folded = l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=-4, out_bits=8, out_exp=-4,
                       eps_log2=eps_log2)
    assert folded.shape == (c, 3) and folded.dtype == np.int64
    y = l1bn_inference(QTensor(x, -4), folded, out_bits=8, out_exp=-4)
    want = oracle.l1bn_inference_oracle(x, -4, gamma.q, gamma.exp, beta.q, beta.exp, run_mean,
                                        run_dev, 8, -4, eps_log2)
    np.testing.assert_array_equal(y.q, want)
    xr = np.ldexp(x.astype(np.float64), -4)
    shape_c = (1, c) + (1,) * (x.ndim - 2)
    eps = 0.0 if eps_log2 is None else 2.0**eps_log2
    y_f = (gamma.value().reshape(shape_c) * (xr - (run_mean * 2.0**RUN_EXP).reshape(shape_c))
           / ((run_dev * 2.0**RUN_EXP).reshape(shape_c) + eps) + beta.value().reshape(shape_c))
    y_f = np.clip(np.floor(y_f * 16 + 0.5), -127, 127)
    assert np.abs(y.q - y_f).max() <= 1


def test_inference_with_batch_statistics_equals_training_forward():
    """Folding the batch's own statistics reproduces the training forward within 1 LSB."""
    x, gamma, beta, _, _ = make_case((16, 3, 4, 4), seed=11)
    y_train, cache = run_forward(x, gamma, beta, 8, -4)
    run_mean, run_dev = np.zeros(3, np.int64), np.zeros(3, np.int64)
    l1bn_update_running(run_mean, run_dev, cache, 1 << MOMENTUM_BITS)  # momentum 1: copy batch
    folded = l1bn_fold(gamma, beta, run_mean, run_dev, x_exp=-4, out_bits=8, out_exp=-4)
    y_inf = l1bn_inference(QTensor(x, -4), folded, out_bits=8, out_exp=-4)
    assert np.abs(y_inf.q.astype(int) - y_train.q).max() <= 1


# --- argument checking ------------------------------------------------------------------------


def _args():
    x, gamma, beta, dy, _ = make_case((4, 3, 2, 2))
    return QTensor(x, -4), gamma, beta, dy


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda a: a.update(x=QTensor(a["x"].q.astype(np.int32), -4)), TypeError, "x.q"),
    (lambda a: a.update(x=QTensor(a["x"].q.astype(np.float32), -4)), TypeError, "x.q"),
    (lambda a: a.update(x=a["x"].q), TypeError, "x"),
    (lambda a: a.update(x=QTensor(a["x"].q[0], -4)), ValueError, "x.q"),
    (lambda a: a.update(gamma=QTensor(a["gamma"].q.astype(np.int64), -12)), TypeError,
     "gamma.q"),
    (lambda a: a.update(gamma=QTensor(a["gamma"].q[:2], -12)), ValueError, "gamma.q"),
    (lambda a: a.update(beta=QTensor(a["beta"].q.reshape(3, 1), -12)), ValueError, "beta.q"),
    (lambda a: a.update(out_bits=1), ValueError, "out_bits"),
    (lambda a: a.update(out_bits=17), ValueError, "out_bits"),
    (lambda a: a.update(out_bits=8.0), TypeError, "out_bits"),
    (lambda a: a.update(out_exp=1000), ValueError, "out_exp"),
    (lambda a: a.update(beta=QTensor(np.full(3, 2**30, np.int32), 0)), ValueError, "beta"),
])
def test_forward_rejects_bad_arguments(mutate, exc, name):
    """Wrong dtype, rank, shape or range raises TypeError/ValueError naming the argument."""
    x, gamma, beta, _ = _args()
    a = dict(x=x, gamma=gamma, beta=beta, out_bits=8, out_exp=-4)
    mutate(a)
    with pytest.raises(exc, match=name):
        l1bn_forward(a["x"], a["gamma"], a["beta"], out_bits=a["out_bits"],
                     out_exp=a["out_exp"])


def test_backward_rejects_bad_arguments():
    """dy must be int8 with the forward's shape; the cache must come from l1bn_forward."""
    x, gamma, beta, dy = _args()
    _, cache = l1bn_forward(x, gamma, beta, out_bits=8, out_exp=-4)
    with pytest.raises(TypeError, match="dy.q"):
        l1bn_backward(QTensor(dy.astype(np.int32), -6), cache, dx_bits=8, dx_exp=-6)
    with pytest.raises(ValueError, match="dy.q"):
        l1bn_backward(QTensor(dy[:2], -6), cache, dx_bits=8, dx_exp=-6)
    with pytest.raises(TypeError, match="cache"):
        l1bn_backward(QTensor(dy, -6), (1, 2), dx_bits=8, dx_exp=-6)
    with pytest.raises(ValueError, match="dx_bits"):
        l1bn_backward(QTensor(dy, -6), cache, dx_bits=0, dx_exp=-6)


@pytest.mark.parametrize("shape", [(64, 5), (8, 6, 4, 4)])
def test_out_buffers_receive_the_same_codes(shape):
    """Writing into caller-owned out= buffers gives the same codes and returns those buffers."""
    x, gamma, beta, dy, _ = make_case(shape, seed=12)
    y, cache = run_forward(x, gamma, beta, 8, -4)
    dx, _, _ = l1bn_backward(QTensor(dy, -6), cache, dx_bits=16, dx_exp=-10)
    y_buf = np.full(shape, 99, dtype=np.int8)
    dx_buf = np.full(shape, 99, dtype=np.int16)
    y2, cache2 = l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=8, out_exp=-4, out=y_buf)
    dx2, _, _ = l1bn_backward(QTensor(dy, -6), cache2, dx_bits=16, dx_exp=-10, out=dx_buf)
    assert y2.q is y_buf and dx2.q is dx_buf
    np.testing.assert_array_equal(y_buf, y.q)
    np.testing.assert_array_equal(dx_buf, dx.q)


def test_out_buffer_must_match():
    """An out= buffer of the wrong dtype or shape is refused, naming it."""
    x, gamma, beta, _, _ = make_case((8, 3, 2, 2))
    with pytest.raises(TypeError, match="out"):
        l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=8, out_exp=-4,
                     out=np.empty(x.shape, np.int16))
    with pytest.raises(ValueError, match="out"):
        l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=8, out_exp=-4,
                     out=np.empty((8, 3, 4), np.int8))


def test_both_affine_forms_are_exercised():
    """A typical channel takes the int32 (narrow) affine, a near-constant one with a 16-bit
    output the exactly centred int64 (wide) one; both are oracle-exact and within 1 LSB."""
    from qkernels.fixedpoint import fits_int32
    from qkernels.l1bn import backward_params, forward_params

    x, gamma, beta, dy, _ = make_case((64, 2, 8, 8), seed=13)
    x[:, 1] = 5
    x[0, 1, 0, 0] = 6  # sigma = 2(m-1)/m**2 LSB: a slope of about m/2 output LSBs per code
    out_exp = -12
    _, cache, stats = check_forward(x, gamma, beta, 16, out_exp)
    check_backward(x, dy, gamma, cache, stats, 16, -10)
    m = 64 * 64
    narrow = []
    for c in range(2):
        a, b, sh = forward_params(stats["sum"][c], m, stats["rmant"][c], stats["rexp"][c],
                                  int(gamma.q[c]), gamma.exp - out_exp, int(beta.q[c]),
                                  beta.exp - out_exp)
        narrow.append(bool(fits_int32(a, abs(b), sh)))
    assert narrow == [True, False]
    g_rows = np.moveaxis(dy, 1, 0).reshape(2, -1).astype(np.int64)
    x_rows = np.moveaxis(x, 1, 0).reshape(2, -1).astype(np.int64)
    k_shift = gamma.exp + (-6) - (-4) - (-10)
    a, b, sh = backward_params(stats["sum"][1], m, stats["sign_sum"][1], stats["rmant"][1],
                               stats["rexp"][1], g_rows[1].sum(), (g_rows[1] * x_rows[1]).sum(),
                               int(gamma.q[1]), k_shift)
    assert not fits_int32(a, np.abs(b).max(), sh)


@pytest.mark.parametrize("shape", [(64, 5), (16, 6, 6, 6)])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_exponents_chosen_from_the_range(shape, bits):
    """out_exp/dx_exp=None pick the exponent from the range: results stay oracle-exact and
    within 1 LSB; y's largest code reaches the top half of the format (dx's exponent comes
    from a bound, so only its upper side is guaranteed), and at most the few values rounding
    up to 2**(bits-1) saturate."""
    x, gamma, beta, dy, _ = make_case(shape, in_bits=8, out_bits=bits, seed=bits)
    y, cache, stats = check_forward(x, gamma, beta, bits, None)
    dx = check_backward(x, dy, gamma, cache, stats, bits, None)
    q = (1 << (bits - 1)) - 1
    assert (q + 1) // 2 <= int(np.abs(y.q.astype(np.int64)).max()) <= q
    for t in (y.q, dx.q):
        assert np.mean(np.abs(t.astype(np.int64)) == q) < 0.01


def test_backward_offsets_at_the_largest_m():
    """m = M_MAX with one outlier and dy = 127*sgn(x - mu): the exact dx is 0 everywhere; the
    backward's offsets (about 2**61 in fixed point) must not be clipped."""
    m = M_MAX
    x = np.full((m, 1), -127, np.int8)
    x[0] = 127
    dy = np.where(x > -127, 127, -127).astype(np.int8)
    gamma, beta = QTensor(np.array([5000], np.int32), -12), QTensor(np.zeros(1, np.int32), -12)
    y, cache = l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=8, out_exp=-4)
    dx, _, _ = l1bn_backward(QTensor(dy, -6), cache, dx_bits=8, dx_exp=-6)
    want = oracle.l1bn_backward_float64(x, -4, dy, -6, gamma.q, -12, 8, -6)[0]
    assert np.abs(dx.q.astype(np.int64) - want).max() <= 1


@pytest.mark.parametrize("dx_exp", [-10, -14, -18, -22])
def test_huge_gain_keeps_signs(dx_exp):
    """A slope far past the clamp (gamma = 2**18) scales the whole backward affine down, so
    saturated errors keep the sign of the float64 result (they used to flip)."""
    rng = np.random.default_rng(3)
    x = rng.integers(-127, 128, size=(16, 1), dtype=np.int8)
    dy = rng.integers(-127, 128, size=(16, 1), dtype=np.int8)
    gamma, beta = QTensor(np.array([1 << 30], np.int32), -12), QTensor(np.zeros(1, np.int32), -12)
    _, cache = l1bn_forward(QTensor(x, -4), gamma, beta, out_bits=8, out_exp=-4)
    dx, _, _ = l1bn_backward(QTensor(dy, -6), cache, dx_bits=8, dx_exp=dx_exp)
    want = oracle.l1bn_backward_float64(x, -4, dy, -6, gamma.q, -12, 8, dx_exp)[0]
    assert (np.sign(dx.q[:, 0]) == np.sign(want[:, 0])).all()


def test_running_statistics_saturate_without_overflow():
    """Running statistics at the limit move toward a batch at the opposite limit without
    wrapping around (momentum 1 copies the batch, saturated)."""
    from qkernels.l1bn import RUN_LIMIT

    x = np.full((4, 1), 127, np.int8)
    x[0] = -127
    gamma, beta = QTensor(np.ones(1, np.int32), 0), QTensor(np.zeros(1, np.int32), 0)
    _, cache = l1bn_forward(QTensor(x, 30), gamma, beta, out_bits=8, out_exp=-4)
    mean = np.array([-(1 << 62)], np.int64)
    dev = np.array([1 << 62], np.int64)
    l1bn_update_running(mean, dev, cache, 1 << MOMENTUM_BITS)
    assert mean[0] == RUN_LIMIT and dev[0] == RUN_LIMIT


def test_clamped_slope_still_saturates():
    """A slope past the clamp with beta near its limit: every code off the mean saturates."""
    x = np.array([[0], [1]], dtype=np.int8)
    gamma = QTensor(np.array([1 << 21], np.int32), 0)
    beta = QTensor(np.array([(1 << 20) - 1], np.int32), 0)
    y, _ = l1bn_forward(QTensor(x, 0), gamma, beta, out_bits=16, out_exp=0)
    assert y.q[:, 0].tolist() == [-32767, 32767]


@pytest.mark.parametrize("shape", [(64, 5), (16, 6, 6, 6)])
def test_range_exponent_path_equals_given_exponent_path(shape):
    """Choosing the exponent from the range runs statistics and apply as separate phases; the
    codes equal those of the one-region path given that same exponent."""
    x, gamma, beta, dy, _ = make_case(shape, seed=14)
    y_auto, cache_auto = run_forward(x, gamma, beta, 8, None)
    y_given, cache_given = run_forward(x, gamma, beta, 8, y_auto.exp)
    np.testing.assert_array_equal(y_auto.q, y_given.q)
    dx_auto, dg_auto, db_auto = l1bn_backward(QTensor(dy, -6), cache_auto, dx_bits=8)
    dx_given, dg_given, db_given = l1bn_backward(QTensor(dy, -6), cache_given, dx_bits=8,
                                                 dx_exp=dx_auto.exp)
    for a, b in ((dx_auto, dx_given), (dg_auto, dg_given), (db_auto, db_given)):
        assert a.exp == b.exp
        np.testing.assert_array_equal(a.q, b.q)
