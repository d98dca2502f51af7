"""The quantized layers and training step: drop-in behaviour, backends, reproducibility,
float equivalence, and accuracy on real data."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qkernels import QTensor
from qkernels.quant import quantize_nearest
from qtrain import quant as qquant
from qtrain.loss import cross_entropy
from qtrain.models import build, lenet5
from qtrain.nn import L1BatchNorm1d, L1BatchNorm2d, QuantConv2d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import (BACKEND, QConfig, Quantize, QuantStats, nearest, nearest_rows,
                          quant_report, stochastic, torch_emulation, weight_exponent)
from qtrain.reference import l1_batch_norm
from qtrain.train import evaluate, to_input, train_epoch

def random_batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    return images, labels


def steps(model, qconfig, images, labels, n_steps, batch=16, lr=0.1, out_opt=None,
          weight_decay=0.0):
    """A few SGD steps on fixed batches; returns the last logits."""
    opt = QSGD(model.parameters(), lr=lr, momentum=0.9, qconfig=qconfig,
               weight_decay=weight_decay)
    if out_opt is not None:
        out_opt.append(opt)
    for s in range(n_steps):
        idx = np.arange(s * batch, (s + 1) * batch) % len(labels)
        x = to_input(images[idx])
        y = torch.from_numpy(labels[idx].astype(np.int64))
        out = model(x)
        loss = cross_entropy(out, y, qconfig)
        opt.zero_grad()
        loss.backward()
        opt.step(batch_size=len(idx))
        model.qstate.step += 1
    return out.detach()


# --- drop-in behaviour -------------------------------------------------------------------------


def test_layers_without_quantization_equal_torch_layers():
    """With quantization off, QuantConv2d/QuantLinear load a float state dict and give
    exactly nn.Conv2d/nn.Linear's output."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(20, 7)
    qconv, qlin = QuantConv2d(3, 5, 3, padding=1), QuantLinear(20, 7)
    qconv.load_state_dict(conv.state_dict())
    qlin.load_state_dict(lin.state_dict())
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 20)
    assert torch.equal(qconv(x), conv(x)) and torch.equal(qlin(v), lin(v))
    assert isinstance(qconv, nn.Conv2d) and isinstance(qlin, nn.Linear)
    off = QConfig(bits_w=32, bits_a=32, bits_g=32, bits_e=32, backend="emulate")
    qc = QuantConv2d(3, 5, 3, padding=1, qconfig=off)
    qc.load_state_dict(conv.state_dict())
    assert torch.equal(qc(x), conv(x))


def test_l1_batch_norm_mirrors_batchnorm():
    """L1BatchNorm2d has BatchNorm2d's parameters, buffers and modes (L1 deviation in place
    of the variance) and, unquantized, computes the reference L1BN."""
    bn = L1BatchNorm2d(6, eps=1e-3, momentum=0.2)
    ref = nn.BatchNorm2d(6)
    assert set(bn.state_dict()) == set(ref.state_dict()) - {"running_var"} | {
        "running_dev", "last_out_exp"}
    assert "6, eps=0.001, momentum=0.2, affine=True" in repr(bn)
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    rm, rd = torch.zeros(6), torch.ones(6)
    want = l1_batch_norm(x, rm, rd, bn.weight, bn.bias, True, 0.2, 1e-3)
    assert torch.equal(bn(x), want)
    assert torch.allclose(bn.running_mean, rm) and torch.allclose(bn.running_dev, rd)
    bn.eval()
    xe = torch.randn(2, 6, 5, 5)
    want = (xe - rm[:, None, None]) / (rd[:, None, None] + 1e-3)
    assert torch.allclose(bn(xe), want, atol=1e-6)
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(3, 6))
    with pytest.raises(ValueError, match="2D or 3D"):
        L1BatchNorm1d(6)(torch.randn(3, 6, 2, 2))


def test_quantized_layers_refuse_unsupported_options():
    """The int backend needs integer widths everywhere; a quantized conv takes zero padding
    only (its biases: tests/qtrain/test_bias.py)."""
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        QuantConv2d(1, 2, 3, padding=1, padding_mode="reflect", qconfig=QConfig())
    with pytest.raises(ValueError, match="int backend"):
        QConfig(bits_w=32)
    with pytest.raises(ValueError, match="bits_a"):
        QConfig(bits_a=17)
    with pytest.raises(ValueError, match="norm l1"):
        lenet5("l2", QConfig())


# --- the two backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, norm, bits, n_steps, lr, sr_errors, wexp, wd", [
    ("lenet5", "l1", 8, 3, 0.1, False, "max", 0), ("mlp", "l1", 8, 3, 0.1, False, "max", 0),
    ("lenet5", "none", 8, 3, 0.1, False, "max", 0), ("lenet5", "l1", 6, 3, 0.1, True, "max", 0),
    ("lenet5", "l1", 12, 2, 0.1, False, "max", 0), ("mlp", "l1", 16, 3, 0.1, False, "max", 0),
    ("lenet5", "l1", 2, 8, 15.0, False, "max", 0), ("mlp", "l1", 3, 8, 15.0, False, "max", 0),
    ("lenet5", "l1", 2, 3, 0.1, False, "mean", 0), ("mlp", "l1", 8, 3, 0.1, False, "mean", 0),
    ("lenet5", "l1", 8, 3, 0.1, False, "max", 5e-3), ("mlp", "none", 8, 3, 0.1, False, "max",
                                                      5e-4)])
def test_int_and_emulate_agree_bit_for_bit(name, norm, bits, n_steps, lr, sr_errors, wexp, wd):
    """Training steps of the int and emulate backends from the same initial weights give
    identical logits, parameters, running statistics and quantizer counts -- also with
    stochastically rounded errors, with weight exponents from the mean magnitude, with weight
    decay, and when a huge learning rate makes training diverge at 2-3 bits and the weight
    stores' exponents rise."""
    images, labels = random_batch(48)
    results = []
    for backend in ("int", "emulate"):
        torch.manual_seed(1)
        cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend,
                      seed=3, stochastic_errors=sr_errors, weight_exp=wexp)
        net = build(name, norm, cfg)
        opts = []
        # emulate's own torch quantizers (on CPU it otherwise uses the int backend's kernel)
        with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
            out = steps(net, cfg, images, labels, n_steps, lr=lr, out_opt=opts,
                        weight_decay=wd)
        if lr > 1:  # the weights outgrow their stores, whose exponents rise
            assert sum(s.raised for s in opts[0].stats.values()) > 0
        results.append((out, copy.deepcopy(net.state_dict()), quant_report(net)))
    (o1, s1, r1), (o2, s2, r2) = results
    assert torch.equal(o1, o2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1 == r2


def test_mean_weight_exponent_keeps_two_bit_weights_ternary():
    """With weight_exp="mean", 2-bit weights of a Gaussian layer are about half +-1 (the
    range exponent rounds most of them to 0), the largest saturate and are counted, and both
    backends pick the same exponent."""
    torch.manual_seed(0)
    w = torch.randn(64, 400)
    codes = {}
    for rule in ("max", "mean"):
        for backend in ("int", "emulate"):
            stats = QuantStats()
            with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
                exp = weight_exponent(w, 2, BACKEND[backend], rule)
                codes[rule, backend] = nearest(w, 2, BACKEND[backend], stats, exp)
            if rule == "mean":
                assert 0.01 < stats.saturated / stats.total < 0.2
    for rule in ("max", "mean"):
        assert torch.equal(codes[rule, "int"], codes[rule, "emulate"])
    nonzero = {rule: float((codes[rule, "int"] != 0).float().mean()) for rule in ("max", "mean")}
    assert nonzero["max"] < 0.1 and 0.4 < nonzero["mean"] < 0.75
    assert set(codes["mean", "int"].unique().tolist()) == {-1.0, 0.0, 1.0}  # mean|w| ~ 0.8


def test_optimizer_honours_writes_between_steps_and_float_gradients():
    """QSGD's kernels read each parameter afresh (a write through .data between steps counts),
    and with float gradients (emulate, bits_g=32) they read them as the torch operations do."""
    images, labels = random_batch(32)
    results = []
    for torch_ops in (False, True):
        torch.manual_seed(2)
        cfg = QConfig(bits_w=8, bits_a=8, bits_g=32, bits_e=8, backend="emulate")
        net = build("mlp", "l1", cfg)
        with torch_emulation() if torch_ops else contextlib.nullcontext():
            steps(net, cfg, images, labels, 2)
            for p in net.parameters():
                p.data.mul_(0.5)  # no version bump
            out = steps(net, cfg, images, labels, 2)
        results.append((out, copy.deepcopy(net.state_dict())))
    (o1, s1), (o2, s2) = results
    assert torch.equal(o1, o2) and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("replaced", ["data", "velocity"])
def test_optimizer_follows_a_replaced_parameter_or_velocity(replaced):
    """The int kernels keep a store per parameter (its arrays checked once): a parameter whose
    ``.data`` is replaced, or a velocity loaded into the same optimizer, is stepped as a fresh
    optimizer given the same weights and state steps it."""
    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8, backend="int")
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    grad = (torch.randint(-127, 128, (6, 4), generator=torch.Generator().manual_seed(1))
            * 2.0 ** -9).float()

    def steps(p, opt, n):
        for _ in range(n):
            p.grad = grad.clone()
            opt.step(batch_size=8)

    results = []
    for same_optimizer in (True, False):
        p = torch.nn.Parameter(base.clone())
        opt = QSGD([p], lr=0.1, momentum=0.9, qconfig=cfg)
        steps(p, opt, 2)
        saved, weights = copy.deepcopy(opt.state_dict()), p.detach().clone()
        steps(p, opt, 2)
        if same_optimizer and replaced == "data":
            p.data = weights.clone()  # new memory; the velocity stays
        elif same_optimizer:
            p.data.copy_(weights)  # the same memory; a new velocity
            opt.load_state_dict(saved)
        else:
            state = copy.deepcopy(opt.state_dict()) if replaced == "data" else saved
            p = torch.nn.Parameter(weights.clone())
            opt = QSGD([p], lr=0.1, momentum=0.9, qconfig=cfg)
            opt.load_state_dict(state)
        steps(p, opt, 3)
        results.append((p.detach().clone(), opt.state[p]["velocity"].clone()))
    (w1, v1), (w2, v2) = results
    assert torch.equal(w1, w2) and torch.equal(v1, v2)
    assert not torch.equal(w1, base)


def test_optimizer_steps_a_non_contiguous_parameter_as_a_contiguous_one():
    """The int kernel updates a parameter's own float32 storage in place; a parameter that is
    not contiguous goes through a contiguous copy, with the same integers."""
    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8, backend="int")
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    grad = torch.randint(-127, 128, (4, 6), generator=torch.Generator().manual_seed(1)) * 2.0 ** -9
    results = []
    for contiguous in (True, False):
        p = torch.nn.Parameter(base.t().contiguous() if contiguous else base.clone().t())
        opt = QSGD([p], lr=0.1, momentum=0.9, qconfig=cfg)
        for _ in range(3):
            p.grad = grad.float()
            opt.step(batch_size=8)
        results.append(p.detach().clone())
    assert not p.is_contiguous() and torch.equal(*results)
    assert not torch.equal(results[0], base.t())  # the steps moved it


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_weight_gradient_stops_at_saturated_weights_with_the_mean_exponent(rule):
    """Straight-through everywhere with the range exponent; with the mean exponent the weights
    that saturate get no gradient (else they drift without bound: nothing in the forward
    changes)."""
    torch.manual_seed(0)
    cfg = QConfig(bits_w=2, bits_a=8, bits_g=8, bits_e=8, weight_exp=rule)
    layer = QuantLinear(64, 32, bias=False, qconfig=cfg)
    with torch.no_grad():  # Gaussian weights on a store's grid (|w| < 2**3, 2**-20 steps)
        layer.weight.copy_(torch.round(torch.randn(32, 64) * 2.0 ** 20) * 2.0 ** -20)
    x = torch.randint(-100, 100, (16, 64)).float() * 2.0 ** -7
    layer(x).sum().backward()
    grad = layer.weight.grad
    if rule == "max":
        assert bool((grad != 0).float().mean() > 0.9)
        return
    exp = weight_exponent(layer.weight, 2, BACKEND["int"], "mean")
    saturated = torch.floor(layer.weight.double() * 2.0 ** -exp + 0.5).abs() > 1
    assert 0 < int(saturated.sum()) < grad.numel() // 3
    assert bool((grad[saturated] == 0).all()) and bool((grad[~saturated] != 0).float().mean() > 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 5, 8, 12, 16])
def test_emulate_cpu_kernel_equals_torch_emulation(dtype, bits):
    """On CPU, emulate rounds through qkernels' fused kernel: the same values and counts as its
    torch operations (nearest and stochastic, saturating and zeroing elements included)."""
    gen = torch.Generator().manual_seed(bits)
    t = (torch.randn(3000, generator=gen, dtype=torch.float64) * 50).to(dtype)
    t[:7] = torch.tensor([0.0, 2**-20, -2**-20, 63.75, -63.75, 64.0, -0.0], dtype=dtype)
    for fn, extra in ((nearest, ()), (stochastic, (7, 3, 11))):
        results = []
        for ctx in (contextlib.nullcontext(), torch_emulation()):
            stats = QuantStats()
            with ctx:
                y = fn(t, bits, BACKEND["emulate"], *extra, stats=stats)
            results.append((y, stats))
        (y1, s1), (y2, s2) = results
        assert y1.dtype == y2.dtype == torch.float32
        assert torch.equal(y1, y2) and s1 == s2, fn.__name__
        assert s1.zeroed > 0


def test_training_is_reproducible_and_seeded():
    """Same seed: bit-identical weights; another seed for the stochastic rounding: different."""
    images, labels = random_batch(32)
    finals = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        cfg = QConfig(seed=seed)
        net = lenet5("l1", cfg)
        steps(net, cfg, images, labels, 2)
        finals.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])


def test_weights_activations_errors_gradients_are_on_their_grids():
    """After a step every weight used, activation, error and weight gradient is a k-bit code
    times a power of two, and the counts are readable per layer."""
    images, labels = random_batch(16)
    torch.manual_seed(0)
    cfg = QConfig(bits_w=4, bits_a=6, bits_g=5, bits_e=7)
    net = lenet5("l1", cfg)
    acts, errs = [], []
    for m in net.modules():
        if isinstance(m, Quantize) and m.bits_fwd == 6:
            m.register_forward_hook(lambda mod, i, o: acts.append(o.detach()))
            m.register_full_backward_hook(lambda mod, gi, go: errs.append(gi[0].detach()))
    steps(net, cfg, images, labels, 1)

    def on_grid(t, bits):
        peak = t.abs().max()
        e = int(torch.frexp(peak).exponent) - (bits - 1) if peak > 0 else 0
        codes = t.double() * 2.0 ** -e
        return torch.equal(codes, codes.round()) and codes.abs().max() < 2 ** (bits - 1)

    assert acts and errs
    assert all(on_grid(a, 6) for a in acts) and all(on_grid(e, 7) for e in errs)
    convs = [m for m in net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert all(on_grid(m.weight.grad, 5) for m in convs)
    report = quant_report(net)
    assert any(v["stats_g"]["total"] > 0 for v in report.values() if "stats_g" in v)
    assert all(set(s) == {"saturated", "zeroed", "total"} for v in report.values()
               for s in v.values())


# --- float equivalence --------------------------------------------------------------------------


def torch_lenet5():
    return nn.Sequential(nn.Conv2d(1, 6, 5, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120, bias=False),
                         nn.BatchNorm1d(120), nn.ReLU(), nn.Linear(120, 84, bias=False),
                         nn.BatchNorm1d(84), nn.ReLU(), nn.Linear(84, 10))


def test_weight_decay_moves_the_integer_store_as_torch_moves_floats():
    """Weight decay alone (zero gradients) shrinks the integer store as torch's SGD shrinks the
    same weights in float, to within the store's rounding, whatever the batch size."""
    codes = torch.randint(-1000, 1001, (30, 40)).double()
    for batch in (16, 256):
        p = torch.nn.Parameter((codes * 2.0 ** -10).float())  # on the store's grid (2**-21)
        ref = p.detach().clone().requires_grad_(True)
        opt = QSGD([p], lr=0.1, momentum=0.9, qconfig=QConfig(), weight_decay=0.01)
        ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
        for _ in range(5):
            p.grad, ref.grad = torch.zeros_like(p), torch.zeros_like(ref)
            opt.step(batch_size=batch)
            ref_opt.step()
        assert opt.state[p]["store_exp"] == -21
        p, ref = p.detach().double(), ref.detach().double()
        assert float((p - ref).abs().max()) <= 8 * 2.0 ** -21
        assert float(p.abs().sum()) < 0.995 * float(codes.abs().sum() * 2.0 ** -10)


def test_bits_32_weight_decay_is_torchs_sgd_bit_for_bit():
    torch.manual_seed(0)
    a = torch.nn.Linear(20, 7)
    b = copy.deepcopy(a)
    opt_a = QSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(16, 20)
    for _ in range(4):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters()))


def test_bits_32_reproduces_plain_float_training():
    """With every width 32 (no quantization) LeNet-5 with L2BN trains exactly like the same
    network written with torch's own layers and torch.optim.SGD."""
    images, labels = random_batch(64)
    torch.manual_seed(0)
    ours = lenet5("l2", QConfig(32, 32, 32, 32, backend="emulate"))
    theirs = torch_lenet5()
    mine = [p for p in ours.parameters()]
    for a, b in zip(mine, theirs.parameters()):
        b.data.copy_(a.data)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    steps(ours, None, images, labels, 3)
    for s in range(3):
        idx = np.arange(s * 16, (s + 1) * 16)
        loss = F.cross_entropy(theirs(to_input(images[idx])),
                               torch.from_numpy(labels[idx].astype(np.int64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


# --- accuracy on real data ----------------------------------------------------------------------


#: Per data source (tests/conftest.py's ``fmnist``): training and test images per class, epochs,
#: the epoch from which lr drops from 0.1 to 0.01, the least int8 test accuracy, and how far
#: int8 may trail float (the measurements are in the test's docstring).
ACCURACY = {
    "full": dict(per_class=600, test_per_class=200, epochs=3, drop=None, least=0.78, gap=0.03),
    "subset": dict(per_class=300, test_per_class=100, epochs=8, drop=6, least=0.78, gap=0.05),
}


@pytest.mark.accuracy
def test_int8_lenet5_learns_fashion_mnist_subset(fmnist):
    """W8A8G8E8 LeNet-5 with int8 L1BN learns Fashion-MNIST and keeps up with the same network
    trained in float (L2BN). Chance is 10%. Seed 0 for the model, the data order and the
    rounding; batches of 128, SGD with momentum 0.9, lr 0.1.

    * Full set (Debian's dataset-fashion-mnist, $QTRAIN_DATA or the user cache): 6000
      training images (600 per class), 3 epochs (141 steps), tested on 2000 (200 per class).
      Needs int8 >= 78% and int8 >= float - 3 points. Measured: int8 82.05%, float 83.55%
      (with seed 1 and 2 instead: int8 81.85%, 82.45%; float 81.55%, 82.05%).
    * Shipped subset (when the full set is absent): all 3000 training images, 8 epochs (192
      steps; lr 0.01 in the last two: with 0.1 throughout int8 ended up to 6 points below
      float, depending on the seed), tested on all 1000. Needs int8 >= 78% and
      int8 >= float - 5 points (on 1000 test images the difference of two accuracies has a
      standard error near 1.6 points). Measured: int8 84.20%, float 85.40% (seeds 1 to 4:
      int8 83.30%, 83.80%, 84.00%, 84.30%; float 85.60%, 85.20%, 86.90%, 84.60%).

    Either takes about 20 to 30 s of CPU time. To measure, set ``$QTRAIN_TEST_DATA`` to
    ``full`` or ``subset`` (tests/conftest.py); the accuracies are printed (pytest -s).
    """
    from qtrain.data import stratified_subset

    limits = ACCURACY[fmnist.kind]
    train = stratified_subset(fmnist.train, limits["per_class"], seed=0)
    test = stratified_subset(fmnist.test, limits["test_per_class"], seed=0)
    accs = {}
    for name, cfg, norm in (("int8", QConfig(), "l1"), ("float", None, "l2")):
        torch.manual_seed(0)
        net = lenet5(norm, cfg)
        opt = QSGD(net.parameters(), lr=0.1, momentum=0.9, qconfig=cfg)
        for epoch in range(limits["epochs"]):
            if epoch == limits["drop"]:
                for group in opt.param_groups:
                    group["lr"] = 0.01
            train_epoch(net, opt, train.images, train.labels, batch_size=128, seed=0,
                        epoch=epoch)
        accs[name] = 1 - evaluate(net, test.images, test.labels)
    where = f"on the Fashion-MNIST {fmnist.kind} ({fmnist.source})"
    print(f"test accuracy {where}: int8 {accs['int8']:.4f}, float {accs['float']:.4f}")
    assert accs["int8"] >= limits["least"], (where, accs)
    assert accs["int8"] >= accs["float"] - limits["gap"], (where, accs)


_NETS = [("lenet5", "l1", 8), ("mlp", "l1", 6), ("lenet5", "none", 8), ("lenet5-paper", "l1", 8)]


@pytest.mark.parametrize("name,norm,bits,rule", [
    *[(*net, {"error_exp": "sample"}) for net in _NETS],
    *[(*net, {"norm_errors": "stochastic"}) for net in _NETS if net[1] == "l1"],
    *[(*net, {"act_codes": "unsigned"}) for net in _NETS],
    *[(*net, {"norm_input_exp": "channel"}) for net in _NETS if net[1] == "l1"]])
def test_error_rules_agree_between_backends(name, norm, bits, rule):
    """With errors of one exponent per sample (``error_exp="sample"``), norms that round
    their input's error stochastically (``norm_errors="stochastic"``), unsigned activation
    codes (``act_codes="unsigned"``: 7- and 9-bit codes), or norm inputs with one exponent
    per channel (``norm_input_exp="channel"``), the int and emulate
    backends (its own torch rounding) give identical logits, parameters, statistics and
    counts over three steps, and the rule is in force: the error counts differ from the
    default rules' (with a norm, for norm_errors)."""
    images, labels = random_batch(16 if name == "lenet5-paper" else 48)
    results = {}
    for backend, error_exp in (("int", "sample"), ("emulate", "sample"), ("int", "batch")):
        torch.manual_seed(1)
        cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend,
                      seed=3, **(rule if error_exp == "sample" else {}))
        net = build(name, norm, cfg)
        with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
            out = steps(net, cfg, images, labels, 3)
        results[backend, error_exp] = (out, copy.deepcopy(net.state_dict()), quant_report(net))
    (o1, s1, r1), (o2, s2, r2) = results["int", "sample"], results["emulate", "sample"]
    assert torch.equal(o1, o2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1 == r2
    batch = results["int", "batch"][2]
    assert any(r1[k].get("stats_bwd") != batch[k].get("stats_bwd") for k in batch)
    if "norm_errors" in rule:
        assert all(r1[k]["stats_e"]["total"] for k in r1 if k.endswith("bn"))


@pytest.mark.parametrize("bits", [2, 8, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_rows_torch_equals_the_kernels(bits, dtype):
    """qtrain.quant.nearest_rows: emulate's torch operations give the int backend's values
    and counts, on samples of very different ranges (an all-zero one included)."""
    g = torch.Generator().manual_seed(bits)
    t = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    t = (t * torch.exp2(torch.randint(-6, 6, (6, 1, 1, 1), generator=g))).to(dtype)
    t[2] = 0
    got = {}
    for backend in ("int", "emulate"):
        stats = QuantStats()
        with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
            got[backend] = (nearest_rows(t, bits, BACKEND[backend], stats), stats)
    assert torch.equal(got["int"][0], got["emulate"][0])
    assert got["int"][1] == got["emulate"][1] and got["int"][1].zeroed > 0
    # a sample within 16 - bits binary orders of the batch's largest rounds at its own range
    # (its largest value keeps at least half its size); one further down rounds at the floor
    y, top = got["int"][0].double(), torch.frexp(t.double().abs().max())[1]
    own = [n for n in range(6) if torch.frexp(t[n].double().abs().max())[1] - (bits - 1)
           >= top - 15 and t[n].any()]
    assert len(own) >= 2
    for n in own:
        assert y[n].abs().max() >= t[n].double().abs().max() / 2


def test_error_exp_refusals():
    with pytest.raises(ValueError, match="error_exp 'row'"):
        QConfig(error_exp="row")
    with pytest.raises(ValueError, match="stochastic_errors"):
        QConfig(error_exp="sample", stochastic_errors=True)
    with pytest.raises(ValueError, match="wage"):
        QConfig(error_exp="sample", scheme="wage", bits_w=2)
    with pytest.raises(ValueError, match="norm_errors 'up'"):
        QConfig(norm_errors="up")
    wage = QConfig(norm_errors="stochastic", scheme="wage", bits_w=2)  # no norm: no effect
    build("lenet5", "none", wage)
    with pytest.raises(ValueError, match="set norm_errors nearest"):
        build("lenet5", "l1", wage)
    with pytest.raises(ValueError, match="set norm_errors nearest or error_exp batch"):
        QConfig(norm_errors="stochastic", error_exp="sample")


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("peak", [0, 1, 63, 64, 127, 128, 300])
def test_error_codes_at_their_range_come_back_as_they_are(dtype, peak):
    """Rounding error codes to nearest at their range exponent: codes of ``bits`` already at
    it come back as they are (the same object, counted as nothing saturated or zeroed), all
    others as quantize_nearest rounds them; values and counts equal in every case."""
    if peak > np.iinfo(dtype).max:
        pytest.skip("beyond int8")
    rng = np.random.default_rng(peak)
    q = rng.integers(-peak, peak + 1, (4, 3, 5)).astype(dtype)
    q.flat[0] = -peak
    err = QTensor(q, -11)
    got, counts = qquant._nearest_codes(err, 8, None)
    want, want_counts = quantize_nearest(err, 8)
    assert counts == want_counts and got.exp == want.exp and got.q.dtype == want.q.dtype
    assert np.array_equal(got.q, want.q)
    assert (got is err) == (dtype == np.int8 and (peak == 0 or 64 <= peak <= 127))
