"""QuantMaxPool2d: the strided 2x2 path equals torch's max-pool, ties and errors included."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkernels import QTensor
from qkernels.ieee import codes_to_f32, f32_to_codes_where
from qkernels.pool import (maxpool2x2, maxpool2x2_backward, maxpool2x2_relu_backward_codes,
                           maxpool2x2_relu_backward_of_codes, maxpool2x2_relu_codes)
from qkernels.quant import codes_where
from qtrain.nn import QuantMaxPool2d
from qtrain.quant import torch_emulation


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
@pytest.mark.parametrize("shape", [(3, 4, 6, 8), (2, 6, 24, 24), (5, 4, 2)])
@pytest.mark.parametrize("levels", [3, 255])
def test_fast_path_equals_torch_forward_and_backward(shape, levels, path):
    gen = torch.Generator().manual_seed(levels + shape[-1])
    # few levels: most windows have ties, which torch resolves to the first (row-major) maximum
    x = (torch.randint(0, levels, shape, generator=gen) - levels // 2).float() * 0.25
    gy = torch.randint(-127, 128, (*shape[:-2], shape[-2] // 2, shape[-1] // 2),
                       generator=gen).float()
    pool = QuantMaxPool2d(2)
    assert pool._fast(x)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    with torch_emulation() if path == "torch ops" else contextlib.nullcontext():
        ya, yb = pool(xa), F.max_pool2d(xb, 2)
        assert torch.equal(ya, yb)
        ya.backward(gy)
        yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad)
    # every error lands once: the gradient sums to the error's sum
    assert float(xa.grad.sum()) == float(gy.sum())


def test_other_windows_fall_back_to_torch():
    x = torch.randn(2, 3, 7, 7)
    for pool in (QuantMaxPool2d(3), QuantMaxPool2d(2, stride=1), QuantMaxPool2d(2, padding=1),
                 QuantMaxPool2d(2, ceil_mode=True)):
        assert not pool._fast(x)
        assert torch.equal(pool(x), F.max_pool2d(x, pool.kernel_size, pool.stride,
                                                 pool.padding, pool.dilation, pool.ceil_mode))
    assert not QuantMaxPool2d(2)._fast(x)  # odd height and width


def test_state_dict_and_repr_match_nn_maxpool():
    assert repr(QuantMaxPool2d(2)) == repr(torch.nn.MaxPool2d(2)).replace("MaxPool2d",
                                                                          "QuantMaxPool2d")
    assert QuantMaxPool2d(2).state_dict() == {}


def test_pool_kernels_check_their_arguments():
    with pytest.raises(ValueError, match="even height"):
        maxpool2x2(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="pooled shape"):
        maxpool2x2_backward(np.zeros((1, 2, 4, 4), np.float32), np.zeros((1, 2, 4, 4), np.float32))


@pytest.mark.parametrize("dtype, width", [(np.int8, 7), (np.int16, 15)])
@pytest.mark.parametrize("levels", [3, 40])
def test_relu_pool_on_codes_equals_relu_pool_and_conversion(dtype, width, levels):
    """Pooling relu(codes) and sending the error back to the codes equals ReLU, max-pool and
    the masked conversion one after the other (ties, all-negative windows, zero errors)."""
    rng = np.random.default_rng(levels + width)
    y = (rng.integers(-levels, levels, (3, 4, 6, 8)) * (1 if levels < 10 else 3)).astype(dtype)
    relu = codes_to_f32(QTensor(np.maximum(y, 0), -5))
    pooled, sel = maxpool2x2_relu_codes(y)
    assert pooled.dtype == dtype and sel.shape == pooled.shape
    assert np.array_equal(codes_to_f32(QTensor(pooled, -5)), maxpool2x2(relu))
    for scale in (2.0 ** -30, 1.0):
        gz = (rng.integers(-127, 128, pooled.shape) * scale).astype(np.float32)
        gz[0, 0, 0, :2] = 0
        got = maxpool2x2_relu_backward_codes(sel, gz, width, dtype)
        want = f32_to_codes_where(maxpool2x2_backward(relu, gz), y, width, dtype)
        assert got.exp == want.exp and got.q.dtype == dtype and np.array_equal(got.q, want.q)
    _, none = maxpool2x2_relu_codes(-np.abs(y))  # every window <= 0: nothing goes back
    got = maxpool2x2_relu_backward_codes(none, gz, width, dtype)
    assert (none == -1).all() and got.exp == 0 and not got.q.any()
    with pytest.raises(ValueError, match="pooled shape"):
        maxpool2x2_relu_backward_codes(sel, np.zeros(y.shape, np.float32), width, dtype)
    with pytest.raises(ValueError, match="even height"):
        maxpool2x2_relu_codes(np.zeros((1, 2, 3, 4), np.int8))


@pytest.mark.parametrize("dtype, width", [(np.int8, 7), (np.int16, 15)])
@pytest.mark.parametrize("peak", [0, 1, 9, 127])
def test_relu_pool_backward_of_codes_equals_it_of_their_container(dtype, width, peak):
    """Errors held as codes go back through ReLU and the pool as their float32 container
    does: the same codes at the same exponent (the largest that goes back sets it), and
    through ReLU alone as the masked conversion does."""
    rng = np.random.default_rng(peak + width)
    y = rng.integers(-4, 5, (3, 4, 6, 8)).astype(dtype)
    pooled, sel = maxpool2x2_relu_codes(y)
    for exp in (-20, 0, 5):
        gq = QTensor(rng.integers(-peak, peak + 1, pooled.shape).astype(dtype), exp)
        gz = codes_to_f32(gq)
        got = maxpool2x2_relu_backward_of_codes(sel, gq, width, dtype)
        want = maxpool2x2_relu_backward_codes(sel, gz, width, dtype)
        assert got.exp == want.exp and got.q.dtype == dtype and np.array_equal(got.q, want.q)
        gy = QTensor(rng.integers(-peak, peak + 1, y.shape).astype(dtype), exp)
        got = codes_where(gy, y, width, dtype)
        want = f32_to_codes_where(codes_to_f32(gy), y, width, dtype)
        assert got.exp == want.exp and got.q.dtype == dtype and np.array_equal(got.q, want.q)
    # a code wider than width cannot be shifted into it (where it goes back)
    wide = np.where(sel >= 0, 200, 0).astype(np.int16)
    with pytest.raises(ValueError, match="more than width"):
        maxpool2x2_relu_backward_of_codes(sel, QTensor(wide, 0), 7, np.int8)
    with pytest.raises(ValueError, match="more than width"):
        codes_where(QTensor(np.full(y.shape, 200, np.int16), 0), np.ones(y.shape), 7, np.int8)
    with pytest.raises(ValueError, match="pooled shape"):
        maxpool2x2_relu_backward_of_codes(sel, QTensor(y, 0), width, dtype)
