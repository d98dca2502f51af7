"""qtrain ops --model and qtrain stats (qtrain.analysis)."""

import argparse
import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import qtrain
from qkernels.opcount import OPS, asic_estimate, bn_report, table4_counts
from qtrain import analysis
from qtrain.config import UserError, load_recipe
from qtrain.nn import L1BatchNorm1d, L1BatchNorm2d

#: Debian's Fashion-MNIST where installed, else the subset shipped in the package (the tiny run
#: below takes 10 images per class from either).
FMNIST = Path("/usr/share/datasets/fashion-mnist")
if not FMNIST.is_dir():
    FMNIST = Path(qtrain.__file__).parent / "datasets" / "fashion-mnist-subset"
LENET5_BN = [("2", [128, 6, 24, 24]), ("8", [128, 16, 8, 8]), ("15", [128, 120]),
             ("20", [128, 84])]
LENET5_EPS_LOG2 = round(math.log2(1e-5))  # the layers' eps=1e-5 as the int8 kernels take it


def ops(*argv):
    args = analysis.add_ops_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert analysis.run_ops(args) == 0
    return buf.getvalue()


def stats(*argv):
    args = analysis.add_stats_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert analysis.run_stats(args) == 0
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# ops


@pytest.fixture(scope="module")
def lenet5_ops():
    return json.loads(ops("--model", "lenet5", "--json"))


def test_ops_model_hooks_every_bn_layer(lenet5_ops):
    """The forward hooks see lenet5's four BN inputs at batch 128, in forward order."""
    assert lenet5_ops["model"] == "lenet5" and lenet5_ops["batch"] == 128
    assert [(l["name"], l["shape"]) for l in lenet5_ops["layers"]] == LENET5_BN


@pytest.mark.parametrize("model", ["lenet5", "mlp", "resnet20"])
def test_bn_input_shapes_probe_equals_full_batch(model):
    """Hooking at batch 2 and scaling the batch dimension gives the shapes hooked at batch 16
    (ops --model relies on it to stay cheap for large --batch)."""
    full = analysis.bn_input_shapes(model, 16)
    assert full and full == analysis.bn_input_shapes(model, 16, probe_batch=2)
    assert all(rec["shape"][0] == 16 for rec in full)


def test_ops_model_layer_reports_equal_bn_report(lenet5_ops):
    """Each layer's report is exactly bn_report of its hooked shape (with the layer's eps),
    so it carries the kernels' counts and Table IV's formulas in m = N*H*W and c = C."""
    for layer in lenet5_ops["layers"]:
        shape = tuple(layer["shape"])
        assert layer["report"] == json.loads(json.dumps(
            bn_report(shape, eps_log2=LENET5_EPS_LOG2)))
        c = shape[1]
        m = int(np.prod(shape)) // c
        assert layer["report"]["counts"]["l1bn_table4"] == table4_counts("L1BN", m, c)
        assert layer["report"]["counts"]["l2bn_table4"] == table4_counts("L2BN", m, c)


def test_ops_model_totals_are_sums(lenet5_ops):
    """Total counts are the per-layer counts summed op by op; time and energy of the total are
    the sums of the layers' (linear in the counts); area is one unit per op type used."""
    layers = [l["report"] for l in lenet5_ops["layers"]]
    total = lenet5_ops["total"]
    for key in ("l1bn_kernel", "l2bn_reference"):
        for part in ("forward", "backward", "total"):
            assert total["counts"][key][part] == {
                op: sum(r["counts"][key][part][op] for r in layers) for op in OPS}
    for key, norm in (("l1bn_table4", "L1BN"), ("l2bn_table4", "L2BN")):
        assert total["counts"][key] == {op: sum(r["counts"][key][op] for r in layers)
                                        for op in OPS}
        # Table IV's formulas are linear in m*c and c: the total is the formula's sum
        assert total["counts"][key] == {
            op: sum(table4_counts(norm, r["m"], r["c"])[op] for r in layers) for op in OPS}
    for dtype in ("int8", "float32"):
        for key in ("l1bn_kernel", "l2bn_reference", "l1bn_table4", "l2bn_table4"):
            est = total["asic"][dtype][key]
            for q in ("time_ns", "energy_pJ"):
                assert est[q] == pytest.approx(sum(r["asic"][dtype][key][q] for r in layers),
                                               rel=1e-12)
            counts = total["counts"][key]
            assert est == pytest.approx(asic_estimate(counts.get("total", counts), dtype))
        s = total["saving"][dtype]["table4"]
        l1, l2 = total["asic"][dtype]["l1bn_table4"], total["asic"][dtype]["l2bn_table4"]
        assert s["time"] == pytest.approx(1 - l1["time_ns"] / l2["time_ns"])
        assert s["energy"] == pytest.approx(1 - l1["energy_pJ"] / l2["energy_pJ"])
        assert 0 < s["time"] < 1 and 0 < s["energy"] < 1
    assert lenet5_ops["paper_saving"] == {"time": 0.25, "energy": 0.37}


def test_ops_model_tables_for_people():
    """Without --json: a layer table, the per-layer tables, totals, savings and the paper's."""
    out = ops("--model", "mlp", "--batch", "16")
    assert "16x256" in out and "## Total over layers" in out
    for label in ("L1BN int8 kernel", "L2BN reference", "L1BN Table IV", "L2BN Table IV",
                  "Table IV formulas", "| paper | whole models (Fig. 4) | 25% | 37% |"):
        assert label in out


def test_ops_shapes_still_work():
    """Explicit shapes give the original list of bn_report results."""
    reports = json.loads(ops("16x3x4x4", "32x5", "--json"))
    assert reports == json.loads(json.dumps([bn_report((16, 3, 4, 4)), bn_report((32, 5))]))


@pytest.mark.parametrize("argv, words", [
    ((), "SHAPE"),
    (("16x3x4x4", "--model", "lenet5"), "not both"),
    (("16x3x4x4", "--batch", "8"), "--batch goes with --model"),
    (("--model", "lenet5", "--batch", "1"), "at least 2"),
    (("1x3x1x1",), "more than 1 value per channel"),
    (("--model", "vgg7", "--batch", "9000"), "at most"),
])
def test_ops_user_errors(argv, words):
    """Both or neither of SHAPE and --model, bad batches and shapes: one-line UserErrors."""
    args = analysis.add_ops_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    with pytest.raises(UserError) as err:
        analysis.run_ops(args)
    assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# stats: the core on inputs we control


class _Gaussian(nn.Module):
    """A model whose BN inputs are its (Gaussian) input, rescaled per layer."""

    def __init__(self):
        super().__init__()
        self.bn_a = L1BatchNorm2d(8)
        self.bn_b = L1BatchNorm1d(8)
        self.bn_c = nn.BatchNorm2d(8)

    def forward(self, x):
        self.bn_a(x)
        self.bn_c(3 * x + 7)
        return self.bn_b(x.mean(dim=(2, 3)) * 10)


def test_bn_sigma_ratios_gaussian_is_theorem1():
    """For Gaussian BN inputs the per-channel sigma_L2/sigma_L1 averaged over batches is
    sqrt(pi/2) = 1.2533 within 1% (Theorem 1), for L1BN and nn.BatchNorm layers alike."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 8, 8, 8, generator=gen) for _ in range(10)]
    model = _Gaussian().train()
    layers = analysis.bn_sigma_ratios(model, batches)
    assert model.training  # mode restored
    assert [l["name"] for l in layers] == ["bn_a", "bn_c", "bn_b"]  # forward order
    assert [l["channels"] for l in layers] == [8, 8, 8]
    assert all(l["batches"] == 10 for l in layers)
    for l in layers[:2]:
        assert l["ratio"].shape == (8,)
        assert abs(l["ratio"].mean() / analysis.SQRT_PI_2 - 1) < 0.01
        assert np.all(np.abs(l["ratio"] / analysis.SQRT_PI_2 - 1) < 0.03)
        assert np.allclose(l["sigma_l2"] / l["sigma_l1"], l["ratio"], rtol=0.01)
    # the ratio is scale and shift invariant: 3x+7 gives the same ratios as x
    np.testing.assert_allclose(layers[1]["ratio"], layers[0]["ratio"], rtol=1e-9)
    np.testing.assert_allclose(layers[1]["sigma_l2"], 3 * layers[0]["sigma_l2"], rtol=1e-9)
    # the channel means of 64 images x 64 pixels are Gaussian too (10 x N(0, 1/64))
    assert abs(layers[2]["ratio"].mean() / analysis.SQRT_PI_2 - 1) < 0.05
    assert abs(layers[2]["sigma_l2"].mean() - 10 / 8) < 0.15


def test_bn_sigma_ratios_exact_values_and_constant_channel():
    """Two values +-a per channel give ratio 1; a constant channel is NaN and left out of the
    mean over batches; a uniform channel gives sqrt(4/3)."""
    bn = L1BatchNorm1d(3)
    x1 = torch.tensor([[1.0, 5.0, 2.0], [-1.0, 5.0, 4.0]])
    x2 = torch.tensor([[2.0, 1.0, 0.0], [-2.0, 3.0, 0.0]])
    [layer] = analysis.bn_sigma_ratios(nn.Sequential(bn), [x1, x2])
    np.testing.assert_allclose(layer["ratio"], [1.0, 1.0, 1.0])  # channel 1: NaN then 1
    np.testing.assert_allclose(layer["sigma_l1"], [1.5, 0.5, 0.5])
    u = torch.linspace(-1, 1, 100001)[:, None]
    [layer] = analysis.bn_sigma_ratios(nn.Sequential(L1BatchNorm1d(1)), [u])
    assert layer["ratio"][0] == pytest.approx(math.sqrt(4 / 3), rel=1e-4)
    summary = analysis.ratio_summary(np.array([1.0, np.nan, 3.0]))
    assert summary == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "nan_channels": 1}


def test_stats_on_gaussian_run(tmp_path, monkeypatch):
    """End to end through run_stats with a run whose BN inputs are Gaussian: an mlp whose
    first layer is the identity on Gaussian "images" reports 1.2533 within 1% for it."""
    from qtrain import data as qdata
    from qtrain import run

    cfg = dataclasses.replace(load_recipe("mlp-fmnist"), bits_w=32, bits_a=32, bits_g=32,
                              bits_e=32, backend="emulate", epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run.write_text(run_dir / run.CONFIG, cfg.to_json())
    rng = np.random.default_rng(0)
    # uint8 images whose codes (pixel - 128) are rounded N(0, 20^2): Gaussian enough
    images = np.clip(np.rint(128 + 20 * rng.standard_normal((1280, 28, 28))), 1, 255)
    fake = qdata.Dataset(images=images.astype(np.uint8), labels=np.zeros(1280, np.uint8),
                         name="fashion-mnist", split="test", source="synthetic",
                         classes=tuple(str(i) for i in range(10)))
    monkeypatch.setattr(run, "load_data", lambda cfg, download=True: (fake, fake))
    model, opt = run.build(cfg, (28, 28, 1))
    with torch.no_grad():
        first = model[1]
        first.weight.zero_()
        first.weight[:, :256] = torch.eye(256)
    run.save_checkpoint(run_dir / run.CHECKPOINT, model, opt, 1, cfg, [], 0.0)
    out = stats(str(run_dir), "--batches", "10", "--batch-size", "128")
    assert "1.2533" in out
    result = json.loads((run_dir / "stats.json").read_text())
    assert (run_dir / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["batches"] == 10 and result["images"] == 1280
    first_bn = result["layers"][0]
    assert first_bn["channels"] == 256 and first_bn["shape"] == [128, 256]
    assert abs(first_bn["mean"] / analysis.SQRT_PI_2 - 1) < 0.01
    assert len(first_bn["ratio"]) == len(first_bn["sigma_l2"]) == 256


# ---------------------------------------------------------------------------------------------
# stats: a real tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from qtrain.run import train

    cfg = dataclasses.replace(load_recipe("lenet5-fmnist"), per_class=10, epochs=1,
                              data_dir=str(FMNIST))
    out = tmp_path_factory.mktemp("tiny") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, out, download=False)
    return out


def test_stats_real_run_writes_figure_and_json(tiny_run, tmp_path):
    """qtrain stats on an int8 lenet5 run: a row per BN layer, stats.png and stats.json in the
    run directory (or at --out), ratios >= 1 (Jensen) and near sqrt(pi/2)."""
    out = stats(str(tiny_run), "--batches", "3", "--batch-size", "64")
    for name in ("0.bn", "1.bn", "3.bn", "4.bn", "all"):  # the norms of the fused blocks
        assert f"| {name} |" in out
    png, js = tiny_run / "stats.png", tiny_run / "stats.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(js.read_text())
    assert [(l["name"], l["channels"]) for l in result["layers"]] == [
        ("0.bn", 6), ("1.bn", 16), ("3.bn", 120), ("4.bn", 84)]
    assert result["batches"] == 3 and result["images"] == 192
    assert result["layers"][0]["shape"] == [64, 6, 24, 24]
    ratios = [r for l in result["layers"] for r in l["ratio"] if r is not None]
    assert len(ratios) >= 200 and min(ratios) >= 1 - 1e-9
    assert 1.05 < result["overall"]["mean"] < 1.45
    assert not list(tiny_run.glob(".stats*"))  # no temporary files left
    custom = tmp_path / "fig3.png"
    stats(str(tiny_run), "--batches", "1", "--out", str(custom))
    assert custom.is_file() and json.loads(custom.with_suffix(".json").read_text())["batches"] == 1


def test_stats_user_errors(tmp_path, tiny_run):
    """Not a run directory, no checkpoint, bad counts, bad --out: one-line UserErrors."""
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "config.json").write_text((tiny_run / "config.json").read_text())
    cases = [
        ((str(tmp_path),), "not a run directory"),
        ((str(tmp_path / "missing"),), "not a directory"),
        ((str(tmp_path / "nockpt"),), "no checkpoint.pt"),
        ((str(tiny_run), "--batches", "0"), "--batches"),
        ((str(tiny_run), "--batch-size", "1"), "--batch-size"),
        ((str(tiny_run), "--out", str(tmp_path / "x.txt")), ".png"),
        ((str(tiny_run), "--out", str(tmp_path / "no" / "x.png")), "does not exist"),
    ]
    for argv, words in cases:
        args = analysis.add_stats_arguments(argparse.ArgumentParser()).parse_args(list(argv))
        with pytest.raises(UserError) as err:
            analysis.run_stats(args)
        assert words in str(err.value) and "\n" not in str(err.value), argv
