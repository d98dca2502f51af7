"""Fused blocks (qtrain.fusion.QuantBlock: the Quantize -> L1BN -> ReLU node, with the
convolution before it when that runs as an integer GEMM): grouped once when a model is built,
taken exactly when the int kernels would run the modules, and bit-identical to running them one
by one."""

import copy

import numpy as np
import pytest
import torch

from qtrain import nn as qnn
from qtrain import quant as qquant
from qtrain.fusion import QuantBlock, fuse, unfuse, unfused
from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.quant import QConfig, quant_report, torch_emulation
from qtrain.train import to_input


def count_fused(monkeypatch, convs=None, linears=None):
    """Calls of the fused nodes (all kinds); those of the conv and linear blocks also go to
    ``convs`` and ``linears``."""
    calls = []
    for fn, extra in ((qnn._QuantBNReLUFn, None), (qnn._ConvBlockFn, convs),
                      (qnn._LinearBlockFn, linears)):
        monkeypatch.setattr(fn, "apply", (lambda apply, extra: lambda *a: (
            calls.append(1), extra is not None and extra.append(1), apply(*a))[-1])(
                fn.apply, extra))
    return calls


def one_step(net, cfg, seed=0):
    """Forward, integer loss and backward on one random batch: logits and every gradient."""
    rng = np.random.default_rng(seed)
    x = to_input(rng.integers(0, 256, (24, 28, 28), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, 24))
    out = net(x)
    cross_entropy(out, y, cfg).backward()
    net.qstate.step += 1
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def disable_fusion(net):
    """Every block runs its modules one by one."""
    for m in net.modules():
        if isinstance(m, QuantBlock):
            m.fused = False


@pytest.mark.parametrize("name, bits, sr_errors, rules", [
    ("lenet5", 8, False, {}), ("mlp", 8, False, {}), ("lenet5", 5, True, {}),
    ("mlp", 12, False, {}),
    ("lenet5", 4, True, {"act_codes": "unsigned"}), ("mlp", 8, False, {"act_codes": "unsigned"}),
    ("lenet5", 4, True, {"act_codes": "unsigned", "norm_input_exp": "channel"}),
    ("mlp", 6, False, {"norm_input_exp": "channel"})])
@pytest.mark.parametrize("backend", ["int", "emulate"])
def test_fused_node_equals_the_modules_one_by_one(name, bits, sr_errors, rules, backend,
                                                  monkeypatch):
    cfg = QConfig(bits_w=bits, bits_a=bits, bits_g=bits, bits_e=bits, backend=backend, seed=5,
                  stochastic_errors=sr_errors, **rules)
    torch.manual_seed(0)
    fused = build(name, "l1", cfg)
    plain = copy.deepcopy(fused)
    disable_fusion(plain)
    convs, linears = [], []
    calls = count_fused(monkeypatch, convs, linears)
    results = []
    for net in (fused, plain):
        start = len(calls)
        for s in range(2):
            net.zero_grad()
            out, grads = one_step(net, cfg, seed=s)
        results.append((out, grads, copy.deepcopy(net.state_dict()), quant_report(net),
                        len(calls) - start))
    (o1, g1, s1, r1, n1), (o2, g2, s2, r2, n2) = results
    n_bn = sum(isinstance(m, qnn._L1BatchNorm) for m in fused.modules())
    n_conv = sum(isinstance(m, qnn.QuantConv2d) for m in fused.modules())
    assert n1 == 2 * n_bn and n2 == 0
    n_linear = sum(isinstance(m, QuantBlock) and isinstance(m.layer, qnn.QuantLinear)
                   for m in fused.modules())
    joins = max(bits, cfg.act_code_bits, cfg.error_code_bits) <= 8  # 8-bit codes throughout
    assert len(convs) == (2 * n_conv if joins else 0)  # then the conv joins its node
    assert len(linears) == (2 * n_linear if joins else 0)  # and so does a linear
    assert n_linear >= 2
    assert torch.equal(o1, o2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # running statistics, last exponents
    assert r1 == r2  # every quantizer's saturation and zero counts


@pytest.mark.parametrize("sr_errors", [False, True])
def test_the_output_quantizer_joins_where_it_rounds_to_nearest(sr_errors, monkeypatch):
    """A block's output quantizer becomes part of its fused node (no autograd node of its own)
    where its backward rounds errors to nearest; with stochastic errors it stays a module.
    (test_fused_node_equals_the_modules_one_by_one checks both give the modules' integers.)"""
    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8, stochastic_errors=sr_errors)
    torch.manual_seed(0)
    net = build("lenet5", "l1", cfg)
    quantize_nodes = []
    monkeypatch.setattr(qquant._QuantizeFn, "apply", (lambda apply: lambda *a: (
        quantize_nodes.append(1), apply(*a))[-1])(qquant._QuantizeFn.apply))
    one_step(net, cfg)
    joined = len(quantize_nodes)
    monkeypatch.setattr(qnn, "_out_joins", lambda *args: False)
    quantize_nodes.clear()
    one_step(net, cfg)
    n_blocks = sum(isinstance(m, QuantBlock) for m in net.modules())
    assert n_blocks == 4 and len(quantize_nodes) == joined + (0 if sr_errors else n_blocks)


def test_a_hooked_output_quantizer_stays_a_module():
    """A hook on a block's output quantizer sees it run forward and backward, as before it
    could join the node."""
    cfg = QConfig(bits_w=8, bits_a=8, bits_g=8, bits_e=8)
    torch.manual_seed(0)
    net = build("lenet5", "l1", cfg)
    out = next(m for m in net.modules() if isinstance(m, QuantBlock)).out
    seen = []
    out.register_forward_hook(lambda *args: seen.append("forward"))
    out.register_full_backward_hook(lambda *args: seen.append("backward"))
    one_step(net, cfg)
    assert seen == ["forward", "backward"]


def test_fusion_only_where_the_int_kernels_run(monkeypatch):
    calls = count_fused(monkeypatch)
    cfg = QConfig(backend="emulate")
    torch.manual_seed(0)
    net = build("lenet5", "l1", cfg)
    x = to_input(np.zeros((4, 28, 28), np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None])
    net.eval()
    net(x)  # eval mode: the folded inference affine, no batch statistics
    assert not calls
    net.train()
    with torch_emulation():  # emulate's torch operations
        net(x)
    assert not calls
    net(x.double().float())
    assert len(calls) == 4
    for name, norm in (("lenet5", "l2"), ("lenet5", "none")):
        build(name, norm, cfg)(x)
    assert len(calls) == 4


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_global_hooks_see_every_module_while_unfused(monkeypatch):
    """Inside ``unfused(net)`` a global backward hook sees every module (no fused node), and
    each block's ``fused`` comes back afterwards."""
    calls = count_fused(monkeypatch)
    cfg = QConfig()
    torch.manual_seed(0)
    net = build("lenet5", "l1", cfg)
    seen = []
    handle = torch.nn.modules.module.register_module_full_backward_hook(
        lambda module, gin, gout: seen.append(type(module).__name__))
    try:
        with unfused(net):
            one_step(net, cfg)
    finally:
        handle.remove()
    assert not calls and "L1BatchNorm2d" in seen and "ReLU" in seen
    assert all(m.fused for m in net.modules() if isinstance(m, QuantBlock))
    one_step(net, cfg)
    assert len(calls) == 4


def test_forward_codes_rounds_nothing_it_should_not():
    """Quantize(x, code_bits=...): the identity (counted as the rounding would count it) on codes
    of at most bits_fwd bits; the plain forward otherwise, including float forwards."""
    from qtrain.quant import QState, Quantize
    x = torch.tensor([[-3.0, 0.0, 1.0, 2.5]]) * 2.0 ** -3  # 4-bit-or-narrower codes
    for bits_fwd, bits_in, same in ((8, 8, True), (4, 8, False), (32, 8, False)):
        cfg = QConfig(bits_a=bits_fwd, bits_e=8, backend="emulate")
        q, ref = Quantize(cfg, QState()), Quantize(cfg, QState())
        assert torch.equal(q(x, code_bits=bits_in), ref(x))
        assert q.stats_fwd == ref.stats_fwd or not same
        if same:
            assert q.stats_fwd.as_dict() == {"saturated": 0, "zeroed": 0, "total": 4}


def test_one_unfused_block_runs_its_modules_and_their_hooks(monkeypatch):
    """``block.fused = False`` keeps only that block out (a hook on its conv sees the conv's
    output), with the same integers; a hook on a fused block sees the block."""
    convs = []
    count_fused(monkeypatch, convs)
    cfg = QConfig(seed=5)
    torch.manual_seed(0)
    net = build("lenet5", "l1", cfg)
    hooked = copy.deepcopy(net)
    seen = []
    hooked[0].fused = False
    hooked[0].layer.register_forward_hook(lambda module, args, out: seen.append(out.shape[1:]))
    hooked[1].register_forward_hook(lambda module, args, out: seen.append(out.shape[1:]))
    out, grads = one_step(net, cfg)
    assert len(convs) == 2
    out_h, grads_h = one_step(hooked, cfg)
    assert len(convs) == 3 and seen == [(6, 24, 24), (16, 4, 4)]
    assert torch.equal(out, out_h) and all(torch.equal(grads[k], grads_h[k]) for k in grads)


def test_blocks_are_built_once_and_visible():
    """Quantized L1 models hold QuantBlocks (print shows them), nested ones included; fuse is
    idempotent; unfuse restores the flat layout; float and L2 models have none."""
    net = build("lenet5", "l1", QConfig())
    assert [type(m).__name__ for m in net] == ["QuantBlock", "QuantBlock", "Flatten", "QuantBlock",
                                              "QuantBlock", "QuantLinear", "Quantize"]
    assert "QuantBlock(\n    fused=True\n    (layer): QuantConv2d(1, 6" in str(net)
    keys = list(net.state_dict())
    assert list(fuse(net).state_dict()) == keys
    flat = list(unfuse(copy.deepcopy(net)).state_dict())
    assert flat[:2] == ["0.weight", "2.weight"] and len(flat) == len(keys)
    res = build("resnet20", "l1", QConfig())
    assert sum(isinstance(m, QuantBlock) for m in res.modules()) == 10  # stem + one per block
    assert isinstance(res[1].body[0], QuantBlock)
    for norm, cfg in (("l2", QConfig(backend="emulate")), ("l1", None), ("none", QConfig())):
        assert not any(isinstance(m, QuantBlock) for m in build("lenet5", norm, cfg).modules())


def test_a_checkpoint_from_before_fusion_loads():
    """A flat (pre-fusion) state dict loads into the fused model, values in place."""
    torch.manual_seed(0)
    for name in ("lenet5", "resnet20"):
        src = build(name, "l1", QConfig())
        with torch.no_grad():
            for p in src.parameters():
                p.add_(1.0)
        flat = unfuse(copy.deepcopy(src)).state_dict()
        dst = build(name, "l1", QConfig())
        dst.load_state_dict(flat)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                     dst.state_dict().values()))
        dst.load_state_dict(src.state_dict())  # its own keys load as they are


def test_nested_blocks_fuse_bit_identically(monkeypatch):
    """ResNet-20's blocks (inside _BasicBlock.body) fuse, with the same integers."""
    calls = count_fused(monkeypatch)
    cfg = QConfig(seed=3)
    torch.manual_seed(0)
    fused = build("resnet20", "l1", cfg, classes=10)
    plain = copy.deepcopy(fused)
    disable_fusion(plain)
    rng = np.random.default_rng(0)
    x = to_input(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, 8))
    results = []
    for net in (fused, plain):
        out = net(x)
        cross_entropy(out, y, cfg).backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()},
                        net.state_dict()))
    assert len(calls) == 10
    (o1, g1, s1), (o2, g2, s2) = results
    assert torch.equal(o1, o2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
