"""Tests for the float references in :mod:`qtrain.reference`.

Invariants checked:

* the analytic backward of equation (20) (:class:`L1BNFunction`) equals autograd through the
  L1BN forward (:func:`l1_batch_norm`), and both equal the numpy float64 oracle
  ``qkernels.oracle.l1bn_backward_equation20`` that the integer kernels are tested against;
* Theorem 1: sigma_L2 / sigma_L1 -> sqrt(pi/2) for Gaussian data, and Remark 1 (eq. 16): L1BN
  with gamma equals L2BN with sqrt(pi/2) * gamma on Gaussian data;
* the torch conventions: l2_batch_norm *is* F.batch_norm, running statistics follow
  ``new = (1 - momentum) * old + momentum * batch``, eval mode uses the running statistics, and
  one value per channel in training is a ValueError with torch's message.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkernels.oracle import l1bn_backward_equation20
from qtrain import reference
from qtrain.reference import (
    L1BNFunction,
    l1_batch_norm,
    l1_batch_norm_eq20,
    l2_batch_norm,
    sigma_ratio,
)

SQRT_HALF_PI = math.sqrt(math.pi / 2)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_shape(gen: torch.Generator, rank: int) -> tuple[int, ...]:
    """(N, C, *) of the given rank, N and C in [2, 8], spatial dims in [1, 5] (so m >= 2)."""
    n, c = (int(v) for v in torch.randint(2, 9, (2,), generator=gen))
    return (n, c, *(int(v) for v in torch.randint(1, 6, (rank - 2,), generator=gen)))


def _rows(a: torch.Tensor) -> np.ndarray:
    """(N, C, *) -> (C, m) float64 rows, the oracle's channel-major layout."""
    a = a.detach().numpy()
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def _grads(fn, x, weight, bias, dy):
    """(dx, dweight, dbias) of sum(fn(x, weight, bias) * dy)."""
    leaves = [t for t in (x, weight, bias) if t is not None]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (x, weight, bias)]
    y = fn(*args)
    grads = iter(torch.autograd.grad(y, leaves, dy))
    return y.detach(), tuple(next(grads) if t is not None else None for t in (x, weight, bias))


def _assert_close_scaled(actual, expected, tol=1e-10):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.0e} * scale {scale:.3e}"


def _autograd_l1(eps):
    return lambda x, w, b: l1_batch_norm(x, None, None, w, b, training=True, eps=eps)


def _eq20_l1(eps):
    return lambda x, w, b: l1_batch_norm_eq20(x, w, b, eps)


# ---------------------------------------------------------------------------------------------
# equation (20) == autograd == numpy oracle


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_equation20_matches_autograd_and_oracle(seed, rank, eps):
    """Eq. (20), autograd of the forward and the numpy oracle give the same dx, dgamma, dbeta.

    float64, random shape, input offset/scale, weight (either sign), bias and upstream grad;
    agreement to 1e-10 of the gradient's scale. The two torch forwards are bitwise equal.
    """
    gen = _gen(1000 * seed + rank)
    shape = _random_shape(gen, rank)
    c = shape[1]
    x = 3.0 * torch.randn(shape, generator=gen, dtype=F64) + 5.0 * torch.randn(
        (1, c) + (1,) * (len(shape) - 2), generator=gen, dtype=F64)
    weight = torch.randn(c, generator=gen, dtype=F64)
    bias = torch.randn(c, generator=gen, dtype=F64)
    dy = torch.randn(shape, generator=gen, dtype=F64)

    y_auto, (dx_a, dw_a, db_a) = _grads(_autograd_l1(eps), x, weight, bias, dy)
    y_eq20, (dx_e, dw_e, db_e) = _grads(_eq20_l1(eps), x, weight, bias, dy)
    assert torch.equal(y_auto, y_eq20)
    _assert_close_scaled(dx_e, dx_a)
    _assert_close_scaled(dw_e, dw_a)
    _assert_close_scaled(db_e, db_a)

    dx_o, dw_o, db_o = l1bn_backward_equation20(_rows(x), _rows(dy), weight.numpy(), eps)
    _assert_close_scaled(torch.from_numpy(dx_o), torch.from_numpy(_rows(dx_a)))
    _assert_close_scaled(torch.from_numpy(dw_o), dw_a)
    _assert_close_scaled(torch.from_numpy(db_o), db_a)


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
def test_equation20_without_weight_or_bias(affine):
    """weight=None means gamma = 1 and bias=None means beta = 0, in both backwards."""
    gen = _gen(7)
    x = torch.randn(6, 3, 4, generator=gen, dtype=F64)
    dy = torch.randn(6, 3, 4, generator=gen, dtype=F64)
    weight = torch.randn(3, generator=gen, dtype=F64) if affine[0] else None
    bias = torch.randn(3, generator=gen, dtype=F64) if affine[1] else None
    y_a, grads_a = _grads(_autograd_l1(1e-5), x, weight, bias, dy)
    y_e, grads_e = _grads(_eq20_l1(1e-5), x, weight, bias, dy)
    assert torch.equal(y_a, y_e)
    for ga, ge in zip(grads_a, grads_e):
        assert (ga is None) == (ge is None)
        if ga is not None:
            _assert_close_scaled(ge, ga)
    gamma = weight.numpy() if weight is not None else np.ones(3)
    dx_o, _, _ = l1bn_backward_equation20(_rows(x), _rows(dy), gamma, 1e-5)
    _assert_close_scaled(torch.from_numpy(dx_o), torch.from_numpy(_rows(grads_a[0])))


def test_equation20_with_ties_at_the_mean():
    """Values exactly at the mean (sgn = 0) give the same gradient on all three sides.

    Integer data symmetric about 0 has a mean of exactly 0 and many zeros; torch's subgradient
    of |x| at 0 is 0, which is the sgn(0) = 0 of equation (20) and of the oracle.
    """
    gen = _gen(11)
    v = torch.randint(-2, 3, (5, 4, 3, 3), generator=gen).to(F64)
    x = torch.cat([v, -v])
    assert (x == 0).any() and torch.equal(x.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=F64))
    weight = torch.randn(4, generator=gen, dtype=F64)
    bias = torch.randn(4, generator=gen, dtype=F64)
    dy = torch.randn(x.shape, generator=gen, dtype=F64)
    _, (dx_a, dw_a, db_a) = _grads(_autograd_l1(1e-5), x, weight, bias, dy)
    _, (dx_e, dw_e, db_e) = _grads(_eq20_l1(1e-5), x, weight, bias, dy)
    for actual, expected in ((dx_e, dx_a), (dw_e, dw_a), (db_e, db_a)):
        _assert_close_scaled(actual, expected)
    dx_o, _, _ = l1bn_backward_equation20(_rows(x), _rows(dy), weight.numpy(), 1e-5)
    _assert_close_scaled(torch.from_numpy(dx_o), torch.from_numpy(_rows(dx_a)))


def test_constant_channel_without_eps_outputs_bias_and_passes_no_error():
    """eps = 0 and a constant channel: output is bias, dx is 0, no NaN (the kernels' rule)."""
    gen = _gen(3)
    x = torch.randn(8, 3, 2, 2, generator=gen, dtype=F64)
    x[:, 1] = 0.75  # exact mean, deviation exactly 0
    weight = torch.randn(3, generator=gen, dtype=F64)
    bias = torch.randn(3, generator=gen, dtype=F64)
    dy = torch.randn(x.shape, generator=gen, dtype=F64)
    for fn in (_autograd_l1(0.0), _eq20_l1(0.0)):
        y, (dx, dw, db) = _grads(fn, x, weight, bias, dy)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
        assert torch.equal(y[:, 1], torch.full_like(y[:, 1], bias[1].item()))
        assert torch.equal(dx[:, 1], torch.zeros_like(dx[:, 1]))
        assert dw[1] == 0 and db[1] == dy[:, 1].sum()
    dx_o, _, _ = l1bn_backward_equation20(_rows(x), _rows(dy), weight.numpy(), 0.0)
    assert np.array_equal(dx_o[1], np.zeros_like(dx_o[1]))


def test_equation20_float32_close_to_autograd():
    """In float32 the two backwards differ only by rounding (relative 1e-5 of the scale)."""
    gen = _gen(5)
    x = torch.randn(16, 8, 6, 6, generator=gen)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    _, grads_a = _grads(_autograd_l1(1e-5), x, weight, bias, dy)
    _, grads_e = _grads(_eq20_l1(1e-5), x, weight, bias, dy)
    for ga, ge in zip(grads_a, grads_e):
        assert ge.dtype == torch.float32
        _assert_close_scaled(ge, ga, tol=1e-5)


def test_gradcheck_equation20():
    """Finite differences agree with eq. (20) in float64 away from ties at the mean.

    |x - mean| > 1e-2 for every value, far beyond gradcheck's 1e-6 perturbation, so no value
    crosses the mean (where |x - mean| has a kink) during the check.
    """
    gen = _gen(2024)
    x = torch.randn(3, 2, 2, 2, generator=gen, dtype=F64)
    margin = (x - x.mean(dim=(0, 2, 3), keepdim=True)).abs().min().item()
    assert margin > 1e-2, "test data has a value too close to its channel mean"
    x.requires_grad_(True)
    weight = torch.randn(2, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(2, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(L1BNFunction.apply, (x, weight, bias, 1e-5))
    assert torch.autograd.gradcheck(
        lambda x, w, b: l1_batch_norm(x, None, None, w, b, training=True), (x, weight, bias))


# ---------------------------------------------------------------------------------------------
# Theorem 1 and Remark 1

M_GAUSS = 200_000  # samples per channel


def _gaussian_channels(seed: int) -> torch.Tensor:
    """(50000, 4, 2, 2) float64: 4 channels of 200k N(mu_c, s_c^2) samples, mu_c and s_c varied."""
    gen = _gen(seed)
    mu = torch.tensor([0.0, 3.0, -1.5, 10.0], dtype=F64).reshape(1, 4, 1, 1)
    s = torch.tensor([1.0, 0.25, 2.0, 5.0], dtype=F64).reshape(1, 4, 1, 1)
    return mu + s * torch.randn(M_GAUSS // 4, 4, 2, 2, generator=gen, dtype=F64)


def test_sigma_ratio_gaussian_is_sqrt_half_pi():
    """Theorem 1: on Gaussian data sigma_L2 / sigma_L1 is within 1% of sqrt(pi/2).

    The sampling error is far smaller: by the delta method, log(ratio) has standard deviation
    sqrt((pi - 3) / (2 m)) ~= 6e-4 for m = 200k, so we also assert 6 standard deviations.
    """
    ratio = sigma_ratio(_gaussian_channels(0))
    assert ratio.shape == (4,) and ratio.dtype == F64
    rel = (ratio / SQRT_HALF_PI - 1).abs()
    assert (rel < 0.01).all(), ratio
    assert (rel < 6 * math.sqrt((math.pi - 3) / (2 * M_GAUSS))).all(), ratio


def test_sigma_ratio_other_distributions_and_exact_values():
    """The ratio depends on the distribution: uniform 2/sqrt(3), Laplace sqrt(2); symmetric
    two-point data exactly 1; a constant channel gives NaN (0/0)."""
    gen = _gen(1)
    uniform = torch.rand(M_GAUSS, 1, generator=gen, dtype=F64)
    u = torch.rand(M_GAUSS, 1, generator=gen, dtype=F64) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF of Laplace(0, 1)
    assert abs(sigma_ratio(uniform).item() / (2 / math.sqrt(3)) - 1) < 0.01
    assert abs(sigma_ratio(laplace).item() / math.sqrt(2) - 1) < 0.01
    two_point = torch.tensor([[1.0, 5.0, 2.0], [-1.0, 5.0, 4.0]])
    ratio = sigma_ratio(two_point)
    assert ratio[0] == 1.0 and ratio[2] == 1.0 and torch.isnan(ratio[1])


def test_l1bn_matches_l2bn_with_scaled_gamma_on_gaussian_data():
    """Remark 1, eq. (16): L1BN with gamma equals L2BN with sqrt(pi/2) * gamma on Gaussian data.

    Per channel y_L1 - y_L2 = gamma * xhat_L2 * (r - sqrt(pi/2)) with r = sigma_L2 / sigma_L1,
    up to eps terms of relative size eps / sigma <= 1e-4. So the largest deviation relative to
    the largest |y_L2 - beta| is |r / sqrt(pi/2) - 1| exactly (to 1e-4), which Theorem 1
    bounds by 1%.
    """
    x = _gaussian_channels(1)
    gen = _gen(2)
    gamma = torch.randn(4, generator=gen, dtype=F64)
    beta = torch.randn(4, generator=gen, dtype=F64)
    y1 = l1_batch_norm(x, None, None, gamma, beta, training=True)
    y2 = l2_batch_norm(x, None, None, SQRT_HALF_PI * gamma, beta, training=True)
    dims = (0, 2, 3)
    rel = (y1 - y2).abs().amax(dim=dims) / (y2 - beta.reshape(1, 4, 1, 1)).abs().amax(dim=dims)
    predicted = (sigma_ratio(x) / SQRT_HALF_PI - 1).abs()
    assert (rel < 0.01).all(), rel
    torch.testing.assert_close(rel, predicted, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch conventions


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (4, 3, 5, 5)])
def test_l2_batch_norm_is_torch_batch_norm(shape, training):
    """Same output, same running-buffer updates and same gradients as F.batch_norm, bit for bit."""
    gen = _gen(len(shape))
    x = torch.randn(shape, generator=gen)
    weight, bias = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    dy = torch.randn(shape, generator=gen)

    def ours(x, w, b):
        return l2_batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3)

    def theirs(x, w, b):
        return F.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-3)

    y, grads = _grads(ours, x, weight, bias, dy)
    y_ref, grads_ref = _grads(theirs, x, weight, bias, dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("shape", [(10, 3), (4, 3, 5, 2)])
def test_l1_running_statistics_update(shape):
    """new = (1 - momentum) * old + momentum * batch, batch dev = mean |x - mean| (no Bessel)."""
    gen = _gen(9)
    x = 2.0 * torch.randn(shape, generator=gen, dtype=F64) + 1.0
    old_mean = torch.randn(3, generator=gen, dtype=F64)
    old_dev = torch.rand(3, generator=gen, dtype=F64)
    running_mean, running_dev = old_mean.clone(), old_dev.clone()
    momentum = 0.3
    l1_batch_norm(x, running_mean, running_dev, training=True, momentum=momentum)

    rows = _rows(x)
    batch_mean = rows.mean(axis=1)
    batch_dev = np.abs(rows - batch_mean[:, None]).mean(axis=1)
    expected_mean = (1 - momentum) * old_mean.numpy() + momentum * batch_mean
    expected_dev = (1 - momentum) * old_dev.numpy() + momentum * batch_dev
    np.testing.assert_allclose(running_mean.numpy(), expected_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(running_dev.numpy(), expected_dev, rtol=1e-13, atol=1e-15)

    # momentum 1 replaces the running statistics by the batch statistics
    l1_batch_norm(x, running_mean, running_dev, training=True, momentum=1.0)
    np.testing.assert_allclose(running_dev.numpy(), batch_dev, rtol=1e-13)

    # without buffers, training still works and the output is the same
    y = l1_batch_norm(x, running_mean, running_dev, training=True)
    assert torch.equal(y, l1_batch_norm(x, None, None, training=True))


def test_l1_eval_uses_running_statistics():
    """Eval: y = w * (x - running_mean) / (running_dev + eps) + b, per sample, buffers unchanged."""
    gen = _gen(4)
    x = torch.randn(6, 3, 4, 4, generator=gen, dtype=F64)
    weight, bias, rm = (torch.randn(3, generator=gen, dtype=F64) for _ in range(3))
    rd = torch.rand(3, generator=gen, dtype=F64) + 0.1
    rm0, rd0 = rm.clone(), rd.clone()
    eps = 1e-3
    y = l1_batch_norm(x, rm, rd, weight, bias, training=False, eps=eps)
    c = (1, 3, 1, 1)
    expected = weight.reshape(c) * (x - rm.reshape(c)) / (rd.reshape(c) + eps) + bias.reshape(c)
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(rm, rm0) and torch.equal(rd, rd0)
    # independent of the rest of the batch; one sample is fine in eval mode (as in torch)
    one = l1_batch_norm(x[2:3, :, :1, :1], rm, rd, weight, bias, eps=eps)
    torch.testing.assert_close(one, y[2:3, :, :1, :1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="evaluation mode"):
        l1_batch_norm(x, None, rd)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_raises_like_torch(shape):
    """Training with m = 1 is a ValueError with F.batch_norm's message, in both L1 entries."""
    x = torch.randn(shape)
    with pytest.raises(ValueError) as torch_err:
        F.batch_norm(x, None, None, training=True)
    for call in (lambda: l1_batch_norm(x, None, None, training=True),
                 lambda: l1_batch_norm_eq20(x)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == str(torch_err.value)
        assert "Expected more than 1 value per channel when training" in str(err.value)


def test_bad_arguments_raise_value_error():
    """eps < 0 and inputs without a channel dim are rejected with a clear message."""
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        l1_batch_norm(x, None, None, training=True, eps=-1e-5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        l1_batch_norm_eq20(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        l1_batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        sigma_ratio(torch.randn(5))


def test_docstring_examples_run():
    """The Examples sections of the module's docstrings are valid doctests."""
    torch.manual_seed(0)
    result = doctest.testmod(reference, extraglobs={"torch": torch, "F": F}, verbose=False)
    assert result.attempted > 0 and result.failed == 0
