"""QuantMaxPool2d: the strided 2x2 path equals torch's max-pool, ties and errors included."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkernels.pool import maxpool2x2, maxpool2x2_backward
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
