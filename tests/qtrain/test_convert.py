"""qtrain.convert: a float torch model as a quantized network (layers swapped, quantizers
inserted, blocks fused), its refusals, and a float-trained model fine-tuned in integers."""

import contextlib
import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import qtrain
from qtrain.conversion import GAUSS_L1_RATIO, calibrate
from qtrain.fusion import QuantBlock
from qtrain.models import QNet, lenet5, lenet5_paper
from qtrain.nn import L1BatchNorm2d, QuantConv2d
from qtrain.optim import QSGD
from qtrain.quant import QConfig, Quantize, quant_report, torch_emulation
from qtrain.train import evaluate, to_input, train_epoch


def small_lenet(bias_before_bn=True):
    """conv(bias)->BN->ReLU->pool->conv->BN->ReLU->pool->fc->BN1d->ReLU->fc, for 28x28."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, bias=bias_before_bn), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 5, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10, bias=False))


def random_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))


def band_data(n, seed, classes=8):
    """A small problem: the class is the position of a faint horizontal band in noise (a float
    small_lenet reaches about 98% test accuracy in 2 epochs of 512 images)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 140, size=(n, 28, 28)).astype(np.int64)
    for i, c in enumerate(labels):
        top = 2 + 3 * int(c) + rng.integers(0, 3)
        images[i, top:top + 3] += 45
    return np.clip(images, 0, 255).astype(np.uint8), labels


def test_converted_model_trains_bit_identically_on_int_and_emulate():
    """A hand-written Sequential with a conv bias (folded into its BN), BN, ReLU, max-pool and
    a classifier, converted and trained 3 steps: both backends give identical weights, running
    statistics, quantizer counts and logits."""
    torch.manual_seed(0)
    float_model = small_lenet()
    images, labels = random_data(64)
    results = []
    for backend in ("int", "emulate"):
        cfg = QConfig(backend=backend, seed=3)
        net = qtrain.convert(float_model, cfg)
        assert isinstance(net, QNet) and net.qconfig is cfg
        opt = QSGD(net.parameters(), lr=0.05, momentum=0.9, qconfig=cfg)
        with torch_emulation() if backend == "emulate" else contextlib.nullcontext():
            stats = train_epoch(net, opt, images[:48], labels[:48], batch_size=16, seed=0,
                                epoch=0)
            net.eval()
            with torch.no_grad():
                logits = net(to_input(images[48:]))
        assert net.qstate.step == 3 and math.isfinite(stats["train_loss"])
        results.append((logits, copy.deepcopy(net.state_dict()), quant_report(net)))
    (o1, s1, r1), (o2, s2, r2) = results
    assert torch.equal(o1, o2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1 == r2
    # the float model itself is untouched (convert works on a copy)
    assert float_model[0].bias is not None and isinstance(float_model[0], nn.Conv2d)


def layout(model):
    return [type(m).__name__ for m in model]


def test_converted_model_is_fused_where_lenet5_is():
    """The converted model has the layout of the built-in lenet5-paper (the same layers as
    small_lenet, wider): QuantBlocks for the conv and hidden fc blocks, then the last linear and
    a 16-bit logits quantizer; lenet5 has one fc block more, fused the same way."""
    net = qtrain.convert(small_lenet(), QConfig())
    ref = lenet5_paper("l1", QConfig())
    assert layout(lenet5("l1", QConfig())) == layout(ref)[:4] + ["QuantBlock"] + layout(ref)[4:]
    assert layout(net) == layout(ref) == ["QuantBlock", "QuantBlock", "Flatten", "QuantBlock",
                                          "QuantLinear", "Quantize"]
    assert [b.pool is not None for b in net if isinstance(b, QuantBlock)] == [True, True, False]
    assert net[-1].bits_fwd == ref[-1].bits_fwd == 16
    text = str(net)
    assert text.count("QuantBlock(") == 3 and "bias=False" in text and "Conv2d(1, 4" in text


def test_bias_folding_and_running_statistics():
    """A bias before a BN moves into its running mean; the running L1 deviation is
    sqrt(2/pi) sigma on the fixed-point grid, and gamma is scaled by the same factor, so the
    converted norm computes the float norm's function in eval mode."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model[1].running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        model[1].weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
    net = qtrain.convert(model, QConfig(backend="emulate"), inplace=False)
    bn = next(m for m in net.modules() if isinstance(m, L1BatchNorm2d))
    conv = next(m for m in net.modules() if isinstance(m, QuantConv2d))
    assert conv.bias is None
    assert torch.equal(bn.running_mean, torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64))
    grid = 2.0 ** 24
    want = torch.round(GAUSS_L1_RATIO * torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
                       * grid) / grid
    assert torch.equal(bn.running_dev, want)
    assert np.array_equal(bn._codes_of(bn.running_dev), (want * grid).numpy())  # exact codes
    assert torch.allclose(bn.weight, torch.tensor([1.0, 2.0, -0.5]) * GAUSS_L1_RATIO)
    # float conversion (all widths 32): the bias stays and eval matches the float model
    off = QConfig(bits_w=32, bits_a=32, bits_g=32, bits_e=32, backend="emulate")
    fnet = qtrain.convert(model, off).eval()
    model.eval()
    x = torch.randn(5, 1, 6, 6)
    assert torch.allclose(fnet(x), model(x), atol=1e-5)


def test_own_module_children_are_converted_in_place():
    """A module with its own forward: each layer and norm becomes Sequential(layer, Quantize),
    the last linear gives 16-bit logits, and it trains."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 5, bias=False), nn.BatchNorm2d(4),
                                          nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(4 * 12 * 12, 16, bias=False)
            self.bn = nn.BatchNorm1d(16)
            self.head = nn.Linear(16, 10, bias=False)

        def forward(self, x):
            x = self.features(x).flatten(1)
            return self.head(torch.relu(self.bn(self.fc(x))))

    cfg = QConfig()
    net = qtrain.convert(Net(), cfg)
    assert net.qconfig is cfg and isinstance(net.features[0], QuantBlock)
    assert isinstance(net.fc[1], Quantize) and net.head[1].bits_fwd == 16
    images, labels = random_data(32)
    opt = QSGD(net.parameters(), lr=0.05, qconfig=cfg)
    stats = train_epoch(net, opt, images, labels, batch_size=16, seed=0, epoch=0)
    assert net.qstate.step == 2 and math.isfinite(stats["train_loss"])


def test_float_trained_model_converted_and_fine_tuned(capsys):
    """A float model trained on a synthetic problem, converted to W8A8G8E8 L1BN: its
    accuracy right after conversion (calibrated, no weights changed) stays near the float
    model's, and a few integer fine-tuning steps run (their accuracy is reported)."""
    torch.manual_seed(0)
    train_x, train_y = band_data(512, 0)
    test_x, test_y = band_data(512, 1)
    model = small_lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        train_epoch(model, opt, train_x, train_y, batch_size=32, seed=0, epoch=epoch)
    float_acc = 1 - evaluate(model, test_x, test_y)
    cfg = QConfig()
    net = qtrain.convert(model, cfg)
    calibrate(net, to_input(train_x[:256]))
    assert net.qstate.step == 0
    converted_acc = 1 - evaluate(net, test_x, test_y)
    qopt = QSGD(net.parameters(), lr=0.02, momentum=0.9, qconfig=cfg)
    train_epoch(net, qopt, train_x[:256], train_y[:256], batch_size=32, seed=0, epoch=0)
    tuned_acc = 1 - evaluate(net, test_x, test_y)
    with capsys.disabled():
        print(f"\nfloat {float_acc:.3f}, converted W8A8G8E8 L1BN {converted_acc:.3f}, "
              f"after 8 integer steps {tuned_acc:.3f}")
    for acc in (float_acc, converted_acc, tuned_acc):
        assert math.isfinite(acc) and 0 <= acc <= 1
    # measured: float 0.984, converted 0.980, tuned 0.980 (chance: 0.125)
    assert converted_acc >= float_acc - 0.1


@pytest.mark.parametrize("model, cfg, path, message", [
    (nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2, affine=False),
                                 nn.ReLU())), QConfig(), "0.1", "affine=False"),
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 8, bias=False), nn.LayerNorm(8)), QConfig(), "2",
     "LayerNorm"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.AvgPool2d(2)), QConfig(), "1",
     "AvgPool2d"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2)), QConfig(), "1",
     "int backend runs integer L1 batch norm only"),
])
def test_refusals_name_the_module(model, cfg, path, message):
    norm = "l2" if "L1 batch norm only" in message else "l1"
    with pytest.raises(ValueError) as err:
        qtrain.convert(model, cfg, norm)
    text = str(err.value)
    assert text.startswith(f"{path}: ") or text.startswith(f"{path} (")
    assert message in text and "\n" not in text
    if "cannot quantize" in text:
        assert "supported: nn.Sequential" in text


def test_l2_on_emulate_keeps_float_batch_norm_and_dropout_is_dropped():
    """norm="l2" on emulate keeps torch's BatchNorm (the bias before it folded); a dropout is
    replaced by nn.Identity with a warning naming it."""
    with pytest.warns(UserWarning, match=re.escape("dropout removed at 4")):
        net = qtrain.convert(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=True), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4, bias=False)),
            QConfig(backend="emulate"), "l2")
    assert net.norm == "l2" and any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    assert not any(isinstance(m, (nn.Dropout, QuantBlock)) for m in net.modules())
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 4)


def test_the_convert_and_finetune_example_runs(tmp_path):
    """examples/convert_finetune.py (the docs' Fashion-MNIST figure), one epoch of each on the
    package's subset: the float, converted and fine-tuned test errors, as JSON."""
    import importlib.util
    import json

    from .test_golden import subset_dir

    path = Path(__file__).resolve().parents[2] / "examples" / "convert_finetune.py"
    spec = importlib.util.spec_from_file_location("convert_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "figures.json"
    assert example.main(["--data-dir", str(subset_dir()), "--float-epochs", "1",
                         "--int-epochs", "1", "--train-images", "640", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    errors = [figures["float_test_error"], figures["converted_test_error"],
              *figures["finetuned_test_error"]]
    assert len(errors) == 3 and all(0 <= e < 0.9 for e in errors), errors  # chance: 0.9
