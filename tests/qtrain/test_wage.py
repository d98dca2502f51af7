"""The WAGE scheme (qtrain.wage): its rules against readable float references of WAGE's
equations on small tensors (grid, clip, shift, integer steps), the int and emulate backends
bit-identical over a few steps, and the config's checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qtrain import wage
from qtrain.config import RunConfig, UserError, load_recipe
from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.nn import QuantConv2d, QuantLinear
from qtrain.optim import QSGD
from qtrain.quant import BACKEND, QConfig, torch_emulation
from qtrain.train import to_input

INT = BACKEND["int"]


def S(k):  # noqa: N802 -- WAGE's name
    return 2.0 ** (k - 1)


def Q(x, k):  # noqa: N802 -- round half up, qtrain's rounding of activations and errors
    return np.floor(x * S(k) + 0.5) / S(k)


def C(x, k):  # noqa: N802
    return np.clip(x, -1 + 1 / S(k), 1 - 1 / S(k))


def shift(x):
    return 2.0 ** round(math.log2(x))


def test_shift_exponent_is_round_log2():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(1e-6, 1e6, 2000), 2.0 ** np.arange(-30, 30),
                             [3 * 2.0 ** -149, 1.0, 0.75, 1.5]])
    for v in values:
        assert 2.0 ** wage.shift_exponent(float(v)) == shift(float(v)), v
    # either side of the threshold sqrt(2) * 2**k, where log2 is k + 1/2
    for k in (-7, 0, 5):
        t = math.sqrt(2) * 2.0 ** k
        assert wage.shift_exponent(math.nextafter(t, 0)) == k
        assert wage.shift_exponent(math.nextafter(t, math.inf)) == k + 1
    assert wage.shift_exponent(0.0) is None


def test_weight_scales_match_wage_lenet5_log():
    """WAGE's log of its LeNet-5 at 2 bits prints the scales 2, 16, 16 and 8."""
    fan_ins = [25, 800, 1024, 512]
    assert [2 ** wage.weight_limits(f, 2)[1] for f in fan_ins] == [2, 16, 16, 8]
    bound, _ = wage.weight_limits(25, 2)
    assert bound == max(0.75, math.sqrt(3 / 25))
    assert wage.weight_limits(4, 8)[1] == 0  # alpha < 1.8 (here below 1): not divided
    q = QConfig(2, 8, 8, 8, scheme="wage")
    net = build("lenet5-paper", "none", q)
    layers = [m for m in net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert [m.wage_shift for m in layers] == [1, 4, 4, 3]
    for m in layers:  # the store starts on the 8-bit grid inside C(., 2), ternary after Q
        codes = m.weight.detach().double() * 128
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 64
        assert set(codes.unique().tolist()) <= {-64.0, 0.0, 64.0}


@pytest.mark.parametrize("bits_w, shift_w", [(2, 4), (4, 0), (6, 2)])
def test_weight_codes_are_q_of_c_over_alpha(bits_w, shift_w):
    rng = np.random.default_rng(bits_w)
    store = rng.integers(-128, 129, (6, 7)) / 128.0  # a k_G = 8 store, out of range included
    store[0, :3] = [0.25, -0.25, 0.75]  # ties and a clip
    got = wage.weight_codes(torch.tensor(store, dtype=torch.float32), bits_w, shift_w, None)
    want = np.round(C(store, bits_w) * S(bits_w)) / S(bits_w) / 2 ** shift_w  # half to even
    assert (bits_w != 2) or (want[0, 0] == want[0, 1] == 0)  # +-1/4: both to 0, no sign bias
    assert np.array_equal(got.numpy(), want.astype(np.float32))


def test_activation_is_q_of_c_with_the_clip_mask():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.5, 1.5, (4, 9)).astype(np.float32)
    x[0, :4] = [1 - 1 / 128, 1.0, -1 + 1 / 128, -1.0]
    got, inside = wage.activation(torch.from_numpy(x), 8, INT, None)
    assert np.array_equal(got.numpy(), Q(C(x.astype(np.float64), 8), 8).astype(np.float32))
    assert np.array_equal(inside.numpy(), np.abs(x) <= 1 - 1 / 128)


@pytest.mark.parametrize("scale", [2.0 ** -20, 1.0, 2.0 ** 9])
@pytest.mark.parametrize("bits", [4, 8])
def test_error_is_q_of_c_of_the_shifted_error(scale, bits):
    rng = np.random.default_rng(bits)
    for peak in (1.3, 1.45, 0.71, 1.0):  # Shift of the peak rounds down, up, and exactly
        e = rng.uniform(-1, 1, (5, 8)) * peak * scale
        e[0, 0] = peak * scale
        e = e.astype(np.float32).astype(np.float64)
        s = shift(np.abs(e).max())
        want = Q(C(e / s, bits), bits) * s
        got = wage.error(torch.from_numpy(e.astype(np.float32)), bits, INT, None)
        assert np.array_equal(got.numpy().astype(np.float64), want)
    assert torch.equal(wage.error(torch.zeros(3), 8, INT, None), torch.zeros(3))


@pytest.mark.parametrize("lr", [8.0, 1.0, 0.125])
def test_update_takes_integer_steps_of_the_g_grid(lr):
    """p moves by n / S(k_G) with n the floor or the ceiling of lr * g / Shift(max|g|), is
    clipped to C(., k_W), and n is unbiased over the random stream."""
    rng = np.random.default_rng(2)
    g = torch.tensor(rng.uniform(-1, 1, (40, 50)) * 3e-3, dtype=torch.float32)
    target = lr * g.double() / shift(float(g.abs().max()))
    total = torch.zeros_like(target)
    for step in range(64):
        p = torch.zeros(40, 50)
        p[0, :5] = 0.5  # at the clip
        wage.update(p, g, lr, 2, 8, INT, seed=1, step=step, stream=wage.STREAM_BASE)
        n = -(p.double() * 128)
        assert torch.equal(n, n.round())
        free = torch.ones_like(n, dtype=torch.bool)
        free[0, :5] = False
        assert ((n[free] == target[free].floor()) | (n[free] == target[free].ceil())).all()
        assert (p <= 0.5).all() and (p >= -0.5).all()
        total += torch.where(free, n, target)
    mean = total / 64  # an average of 64 Bernoulli draws per element: within 5 sigma
    assert (mean - target).abs().max() <= 5 * 0.5 / 8 + 1e-9
    assert abs(float((mean - target).mean())) < 0.01  # no bias over the 2,000 elements


def test_lr_must_be_a_power_of_two():
    assert [wage.lr_exponent(v) for v in (8.0, 1.0, 0.125)] == [3, 0, -3]
    with pytest.raises(ValueError, match="power of two"):
        wage.lr_exponent(0.1)


def _steps(backend: str, norm: str = "none", steps: int = 3):
    torch.manual_seed(0)
    q = QConfig(2, 8, 8, 8, backend=backend, scheme="wage", seed=3)
    net = build("lenet5-paper", norm, q)
    opt = QSGD(net.parameters(), lr=8.0, momentum=0.0, qconfig=q)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = to_input(rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
        y = torch.from_numpy(rng.integers(0, 10, 12))
        out = net(x)
        loss = cross_entropy(out, y, q)
        opt.zero_grad()
        loss.backward()
        opt.step(batch_size=12)
        net.qstate.step += 1
        losses.append(float(loss.detach()))
    return [p.detach().clone() for p in net.parameters()], out.detach(), losses, opt


@pytest.mark.parametrize("norm", ["none", "l1"])
def test_int_and_emulate_are_bit_identical_under_wage(norm):
    """The int backend (fused L1 blocks included) and emulate's torch operations."""
    params, out, losses, opt = _steps("int", norm)
    with torch_emulation():
        params_e, out_e, losses_e, _ = _steps("emulate", norm)
    assert losses == losses_e and torch.equal(out, out_e)
    assert all(torch.equal(a, b) for a, b in zip(params, params_e))
    first = params[0].double() * 128  # the store stayed on the 8-bit grid inside C(., 2)
    assert torch.equal(first, first.round()) and first.abs().max() <= 64
    for p in params:  # every parameter, a norm's scale and shift too, on the store's grid
        assert torch.equal(p.double() * 128, (p.double() * 128).round())
    weights = [a for a in params if a.dim() > 1]
    assert any(not torch.equal(a, a.sign() * 0.5) for a in weights)  # the updates moved them
    assert all(s["wage_steps"] == 3 for s in opt.state_dict()["state"].values())


def test_sse_error_is_logits_minus_onehot():
    logits = torch.tensor([[0.5, -0.25, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
    labels = torch.tensor([2, 0])
    loss = wage.sse(logits, labels)
    loss.backward()
    want = logits.detach() - torch.eye(3)[labels]
    assert torch.equal(logits.grad, want)
    assert float(loss.detach()) == pytest.approx(0.5 * float(want.square().sum()) / 2)


def _cfg(**changes):
    base = dict(vars(load_recipe("lenet5-fmnist-paper")))
    base.update(norm="none", scheme="wage", momentum=0.0, lr=8.0, lr_gamma=0.125, bits_w=2)
    base.update(changes)
    return RunConfig(**base)


@pytest.mark.parametrize("changes, message", [
    ({"norm": "l2", "backend": "emulate"}, "norm none or l1"),
    ({"momentum": 0.9}, "plain SGD"),
    ({"lr": 0.1}, "powers of two"),
    ({"lr_gamma": 0.1}, "powers of two"),
    ({"bits_w": 8, "bits_g": 6}, "bits_w=8 > bits_g=6"),
    ({"bits_e": 32, "backend": "emulate"}, "quantizes every class"),
    ({"stochastic_errors": True}, "nearest"),
    ({"scheme": "wag"}, "not one of"),
])
def test_config_refuses_what_wage_cannot_run(changes, message):
    with pytest.raises(UserError, match=message):
        _cfg(**changes)
    _cfg()  # the base is fine


WAGE_FLAGS = ["--recipe", "lenet5-fmnist-paper", "--set", "scheme=wage", "--norm", "none",
              "--set", "momentum=0", "--lr", "8", "--set", "lr_gamma=0.125",
              "--set", "lr_milestones=1", "--bits-w", "2", "--set", "per_class=20",
              "--set", "batch_size=64", "--no-download"]


def _qtrain(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qtrain.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_wage_run_from_the_command_line_resumes_exactly(tmp_path, fake_mnist, monkeypatch):
    """``--set scheme=wage --norm none`` is one config (sets and flags are checked together);
    a run of 2 epochs equals 1 epoch resumed to 2, the updates' random streams included."""
    data = fake_mnist(tmp_path / "data", 30, 5)
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    common = [*WAGE_FLAGS, "--data-dir", str(data)]
    out = _qtrain(*common, "--epochs", "2", "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr
    out = _qtrain(*common, "--epochs", "1", "--out", str(tmp_path / "one"))
    assert out.returncode == 0, out.stderr
    out = _qtrain("--resume", str(tmp_path / "one"), "--epochs", "2")
    assert out.returncode == 0, out.stderr
    a = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    steps = [s["wage_steps"] for s in a["optimizer"]["state"].values()]
    assert steps == [2 * 4] * 4  # 4 batches of 200 images (the last of 8) per epoch, 2 epochs
    assert a["optimizer"]["state"] == b["optimizer"]["state"]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (cfg["scheme"], cfg["norm"], cfg["lr"]) == ("wage", "none", 8.0)


def test_no_grid_quantizer_feeds_a_norm():
    """Under scheme wage a norm's input keeps its range (WAGE has no quantizer there), in
    every built-in network; and a grid quantizer a user puts there is never fused (the fused
    node would round at the range)."""
    from qtrain.nn import L1BatchNorm2d, _fusable, _L1BatchNorm
    from qtrain.quant import QState, Quantize

    q = QConfig(2, 8, 8, 8, scheme="wage")
    for name, kwargs in (("lenet5-paper", {}), ("resnet20", {}), ("mlp", {})):
        mods = list(build(name, "l1", q, **kwargs).modules())
        for before, norm in zip(mods, mods[1:]):
            if isinstance(norm, _L1BatchNorm):
                assert not getattr(before, "grid", False), name
    state = QState()
    grid = Quantize(q, state, grid=True)
    assert grid.grid and not _fusable(grid, L1BatchNorm2d(4, qconfig=q, qstate=state),
                                      torch.nn.ReLU(), torch.zeros(2, 4, 3, 3))


def test_flags_win_over_sets_of_the_same_field():
    from qtrain.config import apply_sets

    cfg = apply_sets(load_recipe("lenet5-fmnist"), ["epochs=3", "bits_g=8"], {"epochs": 5})
    assert (cfg.epochs, cfg.bits_g) == (5, 8)


def test_the_paper_recipe_runs_under_wage_without_a_norm():
    """lenet5-fmnist-paper rounds its norms' errors stochastically; under scheme wage without
    a norm that has nothing to act on and is accepted, with integer L1BN it is refused."""
    base = dict(vars(load_recipe("lenet5-fmnist-paper")))
    assert base["norm_errors"] == "stochastic"
    RunConfig(**{**base, "scheme": "wage", "norm": "none", "bits_w": 2, "lr": 8.0,
                 "momentum": 0.0, "lr_milestones": (60, 75), "lr_gamma": 0.125})
    with pytest.raises(UserError, match="set norm_errors nearest"):
        RunConfig(**{**base, "scheme": "wage", "bits_w": 2, "lr": 8.0, "momentum": 0.0,
                     "lr_milestones": (60, 75), "lr_gamma": 0.125})
