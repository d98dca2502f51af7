"""Frozen integer inference, the qk file and the ONNX export (issue: from qtrain to the device).

A small network is trained a few integer steps on an easy synthetic problem, frozen on
calibration images, and exported; qkernels' torch-free engine and onnxruntime must give
qtrain's frozen logit codes bit for bit, and a broken file one clear error.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from qkernels import qkfile
from qkernels.engine import Network
from qtrain.export import ExportError, network_description, training_state, write_qk
from qtrain.frozen import calibrate, calibrate_and_freeze, freeze, is_frozen, unfreeze
from qtrain.loss import cross_entropy
from qtrain.models import build
from qtrain.optim import QSGD
from qtrain.quant import QConfig, pow2
from qtrain.train import to_input

CLASSES = [f"c{i}" for i in range(10)]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright band whose row is the class, on noise (uint8 (n, 28, 28))."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for c in range(10):
        images[labels == c, 2 * c:2 * c + 6, 4:24] += 180
    return images.astype(np.uint8), labels


def trained(name: str = "lenet5", bits=(8, 8, 8, 8), steps: int = 3, batch: int = 32,
            **qconfig_fields):
    """A quantized ``name`` after ``steps`` integer SGD steps (and its optimizer)."""
    qconfig = QConfig(*bits, **qconfig_fields)
    torch.manual_seed(0)
    kwargs = {"in_features": 784} if name == "mlp" else {}
    model = build(name, "l1", qconfig, **kwargs)
    opt = QSGD(model.parameters(), lr=0.05, momentum=0.9, qconfig=qconfig)
    images, labels = _images(steps * batch, 1)
    model.train()
    for s in range(steps):
        x = to_input(images[s * batch:(s + 1) * batch])
        y = torch.from_numpy(labels[s * batch:(s + 1) * batch])
        loss = cross_entropy(model(x), y, qconfig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(batch_size=batch)
        model.qstate.step += 1
    return model, opt


def logits(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(to_input(images)).double().numpy()


def codes(model, images: np.ndarray, exp: int) -> np.ndarray:
    return (logits(model, images) * pow2(-exp)).astype(np.int64)


@pytest.fixture(scope="module")
def frozen_lenet():
    model, opt = trained()
    calib, _ = _images(300, 2)
    exps = calibrate_and_freeze(model, calib)
    return model, opt, exps


@pytest.fixture(scope="module")
def test_images():
    return _images(120, 3)[0]


def _odd_batch(images: np.ndarray) -> np.ndarray:
    """``images`` after a few high-contrast images that widen every range."""
    loud = np.where(np.indices((4, 28, 28)).sum(0) % 2 == 0, 255, 0).astype(np.uint8)
    return np.concatenate([loud, images])


def test_frozen_prediction_does_not_depend_on_the_batch(frozen_lenet, test_images):
    model, _, _ = frozen_lenet
    alone = logits(model, test_images[:10])
    among = logits(model, _odd_batch(test_images[:10]))[4:]
    assert np.array_equal(alone, among)
    one_by_one = np.concatenate([logits(model, test_images[i:i + 1]) for i in range(10)])
    assert np.array_equal(alone, one_by_one)
    try:  # today's eval: the batch's ranges pick the exponents, so the answer moves
        unfreeze(model)
        alone = logits(model, test_images[:10])
        assert not np.array_equal(alone, np.concatenate([logits(model, test_images[i:i + 1])
                                                         for i in range(10)]))
    finally:
        freeze(model, frozen_lenet[2])


def test_calibration_on_one_batch_reproduces_todays_eval_of_that_batch(frozen_lenet):
    """The exponents are the range rule's over the calibration batches: frozen on one batch,
    the network computes that batch exactly as today's eval does; and each exponent is tight
    (one lower, the batch saturates more codes at that quantizer)."""
    model, _, exps = frozen_lenet
    calib, _ = _images(300, 2)  # calibrate_and_freeze saw these, as one batch of 500 or less
    quants = {n: m for n, m in model.named_modules() if n in exps}
    assert is_frozen(model) and len(quants) == 2 * 4 + 1  # 4 blocks, the logits
    frozen_out = logits(model, calib)
    unfreeze(model)
    try:
        assert np.array_equal(frozen_out, logits(model, calib))
    finally:
        freeze(model, exps)
    for name, q in quants.items():
        before = q.stats_fwd.saturated
        logits(model, calib)
        same = q.stats_fwd.saturated - before
        freeze(model, {**exps, name: exps[name] - 1})
        try:
            logits(model, calib)
            assert q.stats_fwd.saturated - before - same > same, name
        finally:
            freeze(model, exps)


def test_calibrating_a_frozen_network_sees_the_range_rule(frozen_lenet):
    """Calibration unfreezes everything while it runs (the norms' inputs too) and puts the
    frozen exponents back afterwards."""
    model, _, exps = frozen_lenet
    other, _ = _images(200, 9)
    frozen_answer = calibrate(model, other)
    assert is_frozen(model) and {n: q.frozen_exp for n, q in model.named_modules()
                                 if n in exps} == exps
    unfreeze(model)
    try:
        assert calibrate(model, other) == frozen_answer
    finally:
        freeze(model, exps)


def test_calibration_rules():
    from qkernels.quant import calibrated_exponent

    batches = [4] * 18 + [5, 5]
    assert calibrated_exponent(batches) == 4 and calibrated_exponent(batches, "max") == 5
    assert calibrated_exponent([3, 6, 5, 4]) == 5  # the upper median: an exponent seen
    with pytest.raises(ValueError, match="no calibration batch"):
        calibrated_exponent([])
    with pytest.raises(ValueError, match="not one of"):
        calibrated_exponent([1], "mean")


def test_freeze_needs_known_quantizers(frozen_lenet):
    with pytest.raises(ValueError, match="name no quantizer"):
        freeze(frozen_lenet[0], {"nope": 0})


def _export(model, opt, tmp_path, name="m.qk"):
    manifest, arrays = network_description(model, (1, 28, 28), CLASSES)
    state, state_arrays = training_state(model, opt, model.qstate.step)
    manifest["training"] = state
    path = tmp_path / name
    write_qk(path, manifest, {**arrays, **state_arrays})
    return path, manifest, arrays


@pytest.mark.parametrize("name,bits,fields", [
    ("lenet5", (8, 8, 8, 8), {}), ("mlp", (8, 12, 8, 8), {}),
    ("mlp", (16, 16, 8, 8), {}),  # sums past 2**24: rounded as qtrain's float32 containers are
    ("lenet5", (4, 4, 8, 8), {"act_codes": "unsigned"}),  # the norms' outputs one bit wider
    pytest.param("mlp", (6, 8, 8, 8), {}, marks=pytest.mark.slow),
    pytest.param("lenet5", (5, 10, 8, 8), {}, marks=pytest.mark.slow),
])
def test_qk_engine_gives_qtrains_frozen_codes(name, bits, fields, tmp_path, test_images):
    model, opt = trained(name, bits, **fields)
    calibrate_and_freeze(model, _images(300, 2)[0])
    path, manifest, _ = _export(model, opt, tmp_path)
    net = Network.load(path)
    got = net.forward(test_images)
    assert got.exp == manifest["output"]["exp"]
    assert np.array_equal(got.q, codes(model, test_images, got.exp))
    assert np.array_equal(net.predict(test_images, batch_size=7),
                          logits(model, test_images).argmax(1))
    kinds = [layer["op"] for layer in manifest["layers"]]
    assert kinds.count("l1bn") == (4 if name == "lenet5" else 2) and kinds[-1] == "requant"


def test_qk_file_holds_the_training_state(frozen_lenet, tmp_path):
    model, opt, _ = frozen_lenet
    path, _, _ = _export(model, opt, tmp_path)
    qk = qkfile.read(path)
    state = qk.manifest["training"]
    assert state["step"] == 3 and state["bits_g"] == 8
    named = dict(model.named_parameters())
    for p in state["parameters"]:
        store = qk.array(p["store"]).astype(np.float64) * 2.0 ** p["store_exp"]
        assert p["snapped"] and np.array_equal(store, named[p["name"]].detach().double().numpy())
        assert np.array_equal(qk.array(p["velocity"]),
                              opt.state[named[p["name"]]]["velocity"].numpy())
    modules = dict(model.named_modules())
    for bn in state["norms"]:
        m = modules[bn["name"]]
        assert bn["num_batches_tracked"] == 3
        assert np.array_equal(qk.array(bn["running_dev"]) * 2.0 ** bn["run_exp"],
                              m.running_dev.numpy())
    ids = state["stream_ids"]
    assert len({v.get("tensor_id") for v in ids.values()} - {None}) == 9


def test_onnx_gives_qtrains_frozen_codes(frozen_lenet, test_images):
    ort = pytest.importorskip("onnxruntime")
    from qtrain.onnx_export import to_onnx

    model, _, _ = frozen_lenet
    manifest, arrays = network_description(model, (1, 28, 28), CLASSES)
    proto = to_onnx(manifest, arrays)
    ops = {n.op_type for n in proto.graph.node}
    assert {"ConvInteger", "MatMulInteger", "MaxPool"} <= ops
    assert not ops & {"Conv", "MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got, values = session.run(None, {"pixels": test_images[:, None]})
    exp = manifest["output"]["exp"]
    assert got.dtype == np.int32
    assert np.array_equal(got, codes(model, test_images, exp))
    assert np.array_equal(values.astype(np.float64), logits(model, test_images))


def test_onnx_refuses_codes_wider_than_8_bits():
    pytest.importorskip("onnx")
    from qtrain.onnx_export import to_onnx

    model, _ = trained("mlp", (8, 12, 8, 8), steps=1)
    calibrate_and_freeze(model, _images(100, 2)[0])
    with pytest.raises(ExportError, match="at most 8 bits"):
        to_onnx(*network_description(model, (1, 28, 28), CLASSES))


def test_unfrozen_and_unsupported_networks_are_refused():
    model, _ = trained(steps=1)
    with pytest.raises(ExportError, match="no frozen exponent"):
        network_description(model, (1, 28, 28))
    resnet = freeze(build("resnet20", "l1", QConfig()), {})
    with pytest.raises(ExportError, match="_BasicBlock"):
        network_description(resnet, (3, 32, 32))
    with pytest.raises(ExportError, match="not quantized"):
        network_description(build("lenet5", "l1", None), (1, 28, 28))


# --- a broken file gives one clear error ---------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(frozen_lenet, tmp_path_factory):
    model, opt, _ = frozen_lenet
    return _export(model, opt, tmp_path_factory.mktemp("qk"))[0]


def _rewrite(src, dst, *, manifest=None, arrays=None, drop=()):
    """A copy of qk file ``src`` with its manifest or arrays changed (bypassing validation)."""
    with np.load(src) as z:
        content = {k: z[k] for k in z.files if k not in drop}
    m = json.loads(bytes(content[qkfile.MANIFEST]).decode())
    if manifest:
        manifest(m)
    content[qkfile.MANIFEST] = np.frombuffer(json.dumps(m).encode(), np.uint8)
    content.update(arrays or {})
    buf = io.BytesIO()
    np.savez(buf, **content)
    dst.write_bytes(buf.getvalue())
    return dst


def _one_line_error(path, *words):
    with pytest.raises(qkfile.QKFormatError) as err:
        Network.load(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    for w in words:
        assert w in text, text


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.qk"
    bad.write_bytes(data[: len(data) // 2])
    _one_line_error(bad, "not a readable qk file", "export it again")


def test_not_a_qk_file(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    _one_line_error(other, "not a qk file")
    _one_line_error(tmp_path / "missing.qk", "no such file")
    text = tmp_path / "text.qk"
    text.write_text("hello")
    _one_line_error(text, "not a readable qk file")


def test_newer_version(good_file, tmp_path):
    bad = _rewrite(good_file, tmp_path / "v.qk", manifest=lambda m: m.update(version=99))
    _one_line_error(bad, "version 99", "upgrade")


def test_shape_mismatch(good_file, tmp_path):
    with np.load(good_file) as z:
        key = next(k for k in z.files if k.endswith(".weight"))
        w = z[key]
    bad = _rewrite(good_file, tmp_path / "s.qk", arrays={key: w[:, :-1]})
    _one_line_error(bad, key, "manifest says")
    def grow(m):  # manifest and array agree, but the layer no longer chains
        m["arrays"][key]["shape"][1] += 1
    bad = _rewrite(good_file, tmp_path / "c.qk", manifest=grow,
                   arrays={key: np.concatenate([w, w[:, :1]], axis=1)})
    _one_line_error(bad, "weight shape")


def test_missing_array(good_file, tmp_path):
    with np.load(good_file) as z:
        key = next(k for k in z.files if k.endswith(".folded"))
    _one_line_error(_rewrite(good_file, tmp_path / "m.qk", drop=(key,)), key, "missing")


def _layer_of(op):
    def edit(field, value):
        def change(m):
            next(layer for layer in m["layers"] if layer["op"] == op)[field] = value
        return change
    return edit


@pytest.mark.parametrize("change,words", [
    (lambda m: m.update(layers={"a": 1}), "'layers' is missing or not a list"),
    (lambda m: m["layers"].insert(0, "conv"), "layer 0 is not an object"),
    (lambda m: m["input"].update(shape=5), "input shape 5"),
    (lambda m: m["output"].pop("exp"), "output: exp must be an integer"),
    (_layer_of("conv")("stride", [0, 0]), "stride must be two integers >= 1"),
    (_layer_of("conv")("kernel", 5), "kernel must be two integers"),
    (_layer_of("requant")("bits", 40), "bits must be 2..16"),
    (_layer_of("linear")("w_exp", "big"), "w_exp must be an integer"),
    (_layer_of("conv")("w_bits", 3), "weight codes exceed 3 bits"),
    (lambda m: m["training"].pop("lr"), "malformed training state (KeyError: 'lr')"),
    (lambda m: m["training"].update(weight_exp="median"), "unknown weight_exp"),
    (lambda m: m["training"].update(bits_g=32), "2..16 bits"),
])
def test_malformed_manifest_is_one_line(good_file, tmp_path, change, words):
    from qkernels.trainer import Trainer

    bad = _rewrite(good_file, tmp_path / "bad.qk", manifest=change)
    with pytest.raises(qkfile.QKFormatError) as err:
        Trainer.load(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert words in str(err.value), str(err.value)


def test_folded_shift_out_of_range(good_file, tmp_path):
    with np.load(good_file) as z:
        key = next(k for k in z.files if k.endswith(".folded"))
        folded = z[key].copy()
    folded[0, 2] = 100
    _one_line_error(_rewrite(good_file, tmp_path / "f.qk", arrays={key: folded}),
                    "shifts must lie in 0..62")


def test_qk_is_a_plain_zip_of_npy_files(good_file):
    with zipfile.ZipFile(good_file) as z:
        names = z.namelist()
    assert "manifest.json.npy" in names and all(n.endswith(".npy") for n in names)


# --- the engine never needs torch --------------------------------------------------------------


def test_engine_and_trainer_run_where_torch_cannot_be_imported(good_file, frozen_lenet, test_images,
                                                    tmp_path):
    np.save(tmp_path / "x.npy", test_images[:20])
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from qkernels.engine import Network
from qkernels.trainer import Trainer
x = np.load({str(tmp_path / 'x.npy')!r})
net = Network.load({str(good_file)!r})
np.save({str(tmp_path / 'out.npy')!r}, net.forward(x).q)
trainer = Trainer.load({str(good_file)!r})
trainer.step(x, np.arange(len(x)) % 10, lr=0.01)
np.save({str(tmp_path / 'store.npy')!r}, trainer.params["0.layer.weight"].store)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    exp = qkfile.read(good_file).manifest["output"]["exp"]
    assert np.array_equal(np.load(tmp_path / "out.npy"),
                          codes(frozen_lenet[0], test_images[:20], exp))
    before = qkfile.read(good_file).array("store/0.layer.weight")
    assert np.load(tmp_path / "store.npy").shape == before.shape
    assert not np.array_equal(np.load(tmp_path / "store.npy"), before)  # it trained


# --- qtrain export ---------------------------------------------------------------------------------


def qtrain(*args):
    return subprocess.run([sys.executable, "-m", "qtrain.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fake_mnist):
    """A one-epoch int8 L1BN run of lenet5 on tiny Fashion-MNIST-shaped data."""
    root = tmp_path_factory.mktemp("export-run")
    data = fake_mnist(root / "data", 30, 5)
    out = qtrain("--data-dir", str(data), "--set", "per_class=20", "--epochs", "1", "--bits",
                 "8", "--norm", "l1", "--no-download", "--out", str(root / "run"))
    assert out.returncode == 0, out.stderr
    return root / "run"


@pytest.mark.parametrize("fmt", ["qk", "onnx"])
def test_export_command(run_dir, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    target = tmp_path / f"model.{fmt}"
    out = qtrain("export", str(run_dir), "--out", str(target), "--calibration", "100", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["format"] == fmt and target.stat().st_size == summary["bytes"]
    assert summary["check"]["images"] == 50 == summary["check"]["identical"]
    assert 0 <= summary["frozen_test_error"] <= 1 and 0 <= summary["test_error"] <= 1
    if fmt == "qk":
        qk = qkfile.read(target)
        assert qk.manifest["source"]["calibration_images"] == 100
        assert qk.manifest["training"]["config"]["model"] == "lenet5"
    human = qtrain("export", str(run_dir), "--out", str(tmp_path / "again.qk"), "--check", "0")
    assert human.returncode == 0, human.stderr
    assert "today's eval" in human.stdout and "frozen" in human.stdout


@pytest.mark.parametrize("args,words", [
    (["export", "no/such/run"], "not a directory"),
    (["export", "{run}", "--calibration", "0"], "--calibration"),
    (["export", "{run}", "--out", "no/such/dir/m.qk"], "does not exist"),
    (["export", "{run}", "--format", "tar"], "invalid choice"),
])
def test_export_command_bad_input_is_one_line(run_dir, args, words):
    out = qtrain(*[a.format(run=run_dir) for a in args])
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr


def test_export_command_refuses_channel_exponents(tmp_path, fake_mnist):
    data = fake_mnist(tmp_path / "data", 30, 5)
    out = qtrain("--data-dir", str(data), "--set", "per_class=10", "--epochs", "1", "--bits",
                 "6", "--set", "norm_input_exp=channel", "--no-download", "--out",
                 str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    out = qtrain("export", str(tmp_path / "run"))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "norm_input_exp channel" in lines[0], out.stderr


# --- the torch-free trainer continues training bit for bit -------------------------------------


def _continue_in_qtrain(model, opt, images, labels, batch, lr):
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    for s in range(0, len(images), batch):
        out = model(to_input(images[s:s + batch]))
        loss = cross_entropy(out, torch.from_numpy(labels[s:s + batch]), model.qconfig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(batch_size=len(images[s:s + batch]))
        model.qstate.step += 1


@pytest.mark.parametrize("name,bits,fields", [
    ("lenet5", (8, 8, 8, 8), {}),
    ("lenet5", (3, 8, 8, 8), {"weight_exp": "mean", "stochastic_errors": True}),
    ("mlp", (16, 16, 16, 16), {}),  # products and errors past 2**24
    ("lenet5", (8, 8, 8, 8), {"norm_errors": "stochastic"}),
    ("lenet5", (4, 4, 8, 8), {"act_codes": "unsigned", "stochastic_errors": True}),
    pytest.param("lenet5-paper", (8, 8, 8, 8), {}, marks=pytest.mark.slow),
    pytest.param("mlp", (6, 8, 8, 8), {"weight_decay": 5e-4}, marks=pytest.mark.slow),
    pytest.param("lenet5", (8, 8, 10, 12), {}, marks=pytest.mark.slow),
])
def test_trainer_continues_as_the_int_backend(name, bits, fields, tmp_path):
    """Export after 3 steps, then 3 more steps (a last batch of another size) in qtrain's int
    backend and in qkernels' Trainer: the same stores, exponents, velocities, running
    statistics, counters and rounding counts."""
    from qkernels.trainer import Trainer
    from qtrain.quant import quant_report, reset_stats

    decay = fields.pop("weight_decay", 0.0)
    model, opt = trained(name, bits, **fields)
    for g in opt.param_groups:
        g["weight_decay"] = decay
    calibrate_and_freeze(model, _images(100, 2)[0])
    path, _, _ = _export(model, opt, tmp_path)
    trainer = Trainer.load(path)
    reset_stats(model)
    images, labels = _images(80, 7)
    _continue_in_qtrain(model, opt, images, labels, 32, 0.03)
    for s in range(0, 80, 32):
        trainer.step(images[s:s + 32], labels[s:s + 32], lr=0.03)
    state = trainer.network_state()
    assert state["step"] == model.qstate.step == 6
    for n, p in model.named_parameters():
        mine = state["parameters"][n]
        assert mine["exp"] == opt.state[p]["store_exp"], n
        assert np.array_equal(np.ldexp(mine["store"].astype(np.float64), mine["exp"]),
                              p.detach().double().numpy()), n
        assert np.array_equal(mine["velocity"], opt.state[p]["velocity"].numpy()), n
    modules = dict(model.named_modules())
    for n, norm in state["norms"].items():
        m = modules[n]
        for buf in ("running_mean", "running_dev"):
            assert np.array_equal(np.ldexp(norm[buf].astype(np.float64), -24),
                                  getattr(m, buf).numpy()), (n, buf)
        assert norm["num_batches_tracked"] == int(m.num_batches_tracked) == 6
        assert norm["last_out_exp"] == int(m.last_out_exp)
    report = quant_report(model)
    assert {n: report[n] for n in state["counts"]} == state["counts"]
    assert any(c["total"] for layer in state["counts"].values() for c in layer.values())
    # frozen again on the device: the network qtrain would export after the same training
    calib, test = _images(150, 4)[0], _images(40, 5)[0]
    exps = calibrate_and_freeze(model, calib)
    assert trainer.calibrate(calib) == exps
    want, want_arrays = network_description(model, (1, 28, 28), CLASSES)
    got, got_arrays = trainer.description(exps)
    assert got["layers"] == want["layers"] and got["output"]["exp"] == want["output"]["exp"]
    assert want_arrays.keys() == got_arrays.keys()
    for k, a in want_arrays.items():
        assert a.dtype == got_arrays[k].dtype and np.array_equal(a, got_arrays[k]), k
    net = trainer.frozen_network(calib)
    assert np.array_equal(net.forward(test).q, codes(model, test, want["output"]["exp"]))


def test_trainer_refuses_what_it_cannot_continue(tmp_path, frozen_lenet):
    from qkernels.trainer import Trainer

    model, opt, _ = frozen_lenet
    manifest, arrays = network_description(model, (1, 28, 28), CLASSES)
    write_qk(tmp_path / "inference.qk", manifest, arrays)
    with pytest.raises(qkfile.QKFormatError, match="no training state"):
        Trainer.load(tmp_path / "inference.qk")
    fresh, fresh_opt = trained(steps=0)
    calibrate_and_freeze(fresh, _images(50, 2)[0])
    path, _, _ = _export(fresh, fresh_opt, tmp_path, "fresh.qk")
    with pytest.raises(qkfile.QKFormatError, match="after at least one step"):
        Trainer.load(path)


def test_continual_learning_example_device_step(tmp_path):
    """examples/continual_learning.py's device step, on a network pre-trained on 8 of the 10
    synthetic classes: it learns the 2 new ones without importing torch."""
    from pathlib import Path

    images, labels = _images(640, 11)
    old = labels < 8
    qconfig = QConfig()
    torch.manual_seed(0)
    model = build("lenet5", "l1", qconfig)
    opt = QSGD(model.parameters(), lr=0.05, momentum=0.9, qconfig=qconfig)
    n = old.sum() // 32 * 32
    _continue_in_qtrain(model, opt, images[old][:n], labels[old][:n], 32, 0.05)
    calibrate_and_freeze(model, images[old][:200])
    path, _, _ = _export(model, opt, tmp_path)
    test_x, test_y = _images(300, 12)
    data = tmp_path / "device.npz"
    np.savez(data, new_x=images[~old], new_y=labels[~old], replay_x=images[old][:80],
             replay_y=labels[old][:80], test_x=test_x, test_y=test_y)
    example = Path(__file__).resolve().parents[2] / "examples" / "continual_learning.py"
    out = subprocess.run([sys.executable, str(example), "device", str(path), str(data),
                          "--new-per-batch", "16", "--epochs", "4", "--lr", "0.05"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False and result["device_steps"] > 0
    assert result["before"]["new_classes"] == 0.0
    assert result["after"]["new_classes"] > 0.5, result


def test_export_of_color_images(tmp_path):
    """(N, H, W, 3) images: qtrain feeds them channels first; the exported files take
    (N, 3, H, W) pixels and give the same codes."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, 28, 28, 3))
        for c in range(4):
            x[y == c, 4 * c:4 * c + 6, :, c % 3] += 180
        return x.astype(np.uint8), y.astype(np.uint8)

    (xt, yt), (xs, ys) = make(200), make(40)
    data = tmp_path / "rgb.npz"
    np.savez(data, x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    run = tmp_path / "run"
    out = qtrain("--data", str(data), "--model", "mlp", "--epochs", "1", "--bits", "8",
                 "--norm", "l1", "--no-download", "--out", str(run))
    assert out.returncode == 0, out.stderr
    formats = ["qk"] + (["onnx"] if _has("onnxruntime") else [])
    for fmt in formats:
        out = qtrain("export", str(run), "--out", str(tmp_path / f"m.{fmt}"), "--calibration",
                     "100", "--json")
        assert out.returncode == 0, out.stderr
        check = json.loads(out.stdout)["check"]
        assert check["images"] == 40 == check["identical"], check
    assert qkfile.read(tmp_path / "m.qk").manifest["input"]["shape"] == [3, 28, 28]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_export_refuses_per_sample_error_exponents(tmp_path):
    """The torch-free trainer runs one error exponent per tensor: a network trained with
    error_exp sample is refused in one line."""
    model, opt = trained(error_exp="sample")
    calibrate_and_freeze(model, _images(50, 2)[0])
    with pytest.raises(ExportError, match="error_exp sample"):
        _export(model, opt, tmp_path)
