"""Quantized biases: integer codes at the accumulators' exponent, gradients rounded like a
weight's, updated in the integer store; the same integers on every path."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import qtrain
from qtrain import intgemm
from qtrain.loss import cross_entropy
from qtrain.nn import BIAS_MAX, QuantConv2d, QuantLinear, _bias_codes, _WeightFn
from qtrain.optim import QSGD
from qtrain.quant import QConfig, quant_report, torch_emulation
from qtrain.train import to_input


def biased_net() -> nn.Sequential:
    """A hand-written float model: biases before a batch norm (folded), before a ReLU and at
    the classifier (kept as quantized biases), max-pools."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 24), nn.ReLU(), nn.Linear(24, 10))


def _steps(net, cfg, n_steps=3, batch=16, device="cpu"):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n_steps * batch, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_steps * batch)
    opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)
    for s in range(n_steps):
        part = slice(s * batch, (s + 1) * batch)
        out = net(to_input(images[part], device))
        y = torch.from_numpy(labels[part].astype(np.int64)).to(device)
        loss = cross_entropy(out, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step(batch_size=batch)
        net.qstate.step += 1
    return out.detach(), {k: v.clone() for k, v in net.state_dict().items()}, quant_report(net)


@pytest.mark.parametrize("bits", [8, 12])
def test_biased_model_is_the_same_on_every_path(bits):
    """A converted model with biases, trained three steps: int (integer GEMMs for 8 bits),
    its float GEMM path, emulate with its torch operations: identical logits, weights, biases,
    running statistics and counters; the biases are kept where no norm follows, and move."""
    float_net = biased_net()
    runs = []
    for backend, ctx in (("int", contextlib.nullcontext), ("int", intgemm.float_gemm),
                         ("emulate", contextlib.nullcontext), ("emulate", torch_emulation)):
        cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend,
                      seed=5)
        net = qtrain.convert(float_net, cfg)
        layers = [m for m in net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        assert [m.bias is not None for m in layers] == [False, True, True, True]
        before = [m.bias.detach().clone() for m in layers if m.bias is not None]
        with ctx():
            runs.append(_steps(net, cfg))
        after = [m.bias.detach() for m in layers if m.bias is not None]
        assert all(not torch.equal(a, b) for a, b in zip(before, after)), "a bias did not move"
    (o1, s1, r1) = runs[0]
    for o, s, r in runs[1:]:
        assert torch.equal(o, o1)
        assert s.keys() == s1.keys() and all(torch.equal(s[k], s1[k]) for k in s1), \
            [k for k in s1 if not torch.equal(s[k], s1[k])]
        assert r == r1


def test_bias_codes_round_half_up_and_saturate():
    b = torch.tensor([0.375, -0.375, 0.125, 3.0, -1e10], dtype=torch.float32)
    assert _bias_codes(b, -2).tolist() == [2.0, -1.0, 1.0, 12.0, -BIAS_MAX]  # x4, half up
    assert _bias_codes(b, 1).tolist() == [0.0, 0.0, 0.0, 2.0, -BIAS_MAX]


def test_a_bias_changes_the_output_by_its_codes():
    """One quantized linear layer: output = exact accumulator + bias codes at its exponent."""
    cfg = QConfig(backend="int")
    torch.manual_seed(0)
    lin = QuantLinear(16, 3, qconfig=cfg)
    x = to_input(np.random.default_rng(0).integers(0, 256, size=(5, 4, 4), dtype=np.uint8))
    x = x.reshape(5, 16)
    with torch.no_grad():
        y = lin(x)
        w8 = intgemm.codes8(_WeightFn.apply(lin.weight, lin))
        bias = copy.deepcopy(lin.bias)
        lin.bias = None
        y0 = lin(x)
    exp = intgemm.codes8(x).exp + w8.exp  # the accumulators' exponent
    want = y0.double() + _bias_codes(bias, exp) * 2.0 ** exp
    assert torch.equal(y.double(), want) and not torch.equal(y, y0)


# --- momentum=None: the cumulative average ------------------------------------------------------

@pytest.mark.parametrize("bits", [32, 8])
def test_momentum_none_is_the_cumulative_average(bits):
    """L1 batch norm with momentum=None keeps the mean of the batches' statistics, as torch's
    BatchNorm does (float: to float rounding; quantized: to the 16-bit factors' rounding), the
    same on both backends."""
    from qtrain.nn import L1BatchNorm1d

    rng = np.random.default_rng(2)
    batches = [torch.from_numpy(rng.integers(-100, 100, (32, 3)).astype(np.float32) / 64)
               for _ in range(3)]
    means, runs = [], []
    for backend in ("int", "emulate"):
        cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend)
        bn = L1BatchNorm1d(3, momentum=None, qconfig=cfg)
        for x in batches:
            bn(x)
        assert int(bn.num_batches_tracked) == 3
        runs.append((bn.running_mean.clone(), bn.running_dev.clone()))
        means.append(bn.running_mean.double())
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    want = torch.stack([x.double().mean(0) for x in batches]).mean(0)
    tol = 1e-6 if bits == 32 else 1e-3  # 1/3 as 21845 / 2**16
    assert torch.allclose(means[0], want, atol=tol), (means[0], want)
    assert not torch.allclose(means[0], batches[-1].double().mean(0), atol=tol)


def test_biases_are_the_same_on_two_processes(tmp_path):
    """Quantized biases in a data-parallel step: the input's peak all-reduced, so the bias
    codes are the whole batch's and two processes end where one does, bit for bit."""
    from .dist_worker import biased_worker
    from .test_distributed import _assert_same, spawn

    states = []
    for n in (1, 2):
        path = tmp_path / f"w{n}.pt"
        spawn(biased_worker, n, str(path))
        states.append(torch.load(path, weights_only=False))
    _assert_same(states[1], states[0], "2 processes")
