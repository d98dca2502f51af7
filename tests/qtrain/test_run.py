"""Run configs, recipes, checkpoints and exact resumption (qtrain.config, qtrain.run)."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain import config, models, quant
from qtrain.config import DEFAULTED, RunConfig, UserError, apply_sets, load_recipe, recipe_names


def write_idx(path: Path, array: np.ndarray) -> None:
    head = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    path.write_bytes(head + array.astype(np.uint8).tobytes())


def fake_mnist(directory: Path, per_class_train: int, per_class_test: int) -> Path:
    """IDX files of an easy 10-class problem (a bright band whose position is the class)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.arange(10 * n) % 10)
        images = rng.integers(0, 60, (10 * n, 28, 28))
        for c in range(10):
            images[labels == c, 2 * c:2 * c + 6, 4:24] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def qtrain_env(tmp_path: Path) -> dict:
    """No $QTRAIN_DATA and an empty user cache: only --data-dir (or the system) holds data."""
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"  # two runs share the cores
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]),
                                         env.get("PYTHONPATH", "")])
    return env


# --- configs and recipes ---------------------------------------------------------------------

def test_names_match_the_package():
    """config's name lists (kept torch-free) are the models', norms' and backends' names."""
    assert set(config.MODELS) == set(models.MODELS)
    assert set(config.NORMS) == set(models.NORMS)
    assert set(config.BACKENDS) == set(quant.BACKENDS)
    assert set(config.WEIGHT_EXPS) == set(quant.WEIGHT_EXPS)


def test_default_recipe_sets_every_field():
    """Every RunConfig field is set by the default recipe or documented in DEFAULTED."""
    import tomllib
    from importlib import resources

    raw = tomllib.loads((resources.files("qtrain") / "recipes" / "lenet5-fmnist.toml")
                        .read_text())
    fields = set(config.field_names())
    assert set(raw) | set(DEFAULTED) == fields
    assert set(raw) <= fields and set(DEFAULTED) <= fields
    assert config.DEFAULT_RECIPE == "lenet5-fmnist"


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_builds(name):
    """Each packaged recipe is a valid config whose model takes its data's images."""
    from qtrain.run import build
    from qtrain.train import to_input

    cfg = load_recipe(name)
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg  # JSON round trip
    shape = config.DATASETS[cfg.data]
    model, _ = build(cfg, shape)
    images = np.zeros((2, *shape[:2], *(shape[2:] if shape[2] > 1 else ())), np.uint8)
    model.eval()
    with torch.no_grad():
        assert model(to_input(images)).shape == (2, 10)


def test_recipes_named_in_the_issue_exist():
    """The recipes the issue promises ship with the package; the paper's has its schedule."""
    assert {"lenet5-fmnist", "lenet5-fmnist-paper", "wage-2888", "mlp-fmnist", "vgg7-cifar10",
            "resnet20-cifar10"} <= set(recipe_names())
    paper = load_recipe("lenet5-fmnist-paper")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.lr_milestones, paper.lr_gamma,
            paper.momentum) == (90, 128, 0.1, (30, 60), 0.1, 0.9)
    assert [paper.lr_at(e) for e in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    wage = load_recipe("wage-2888")
    assert (wage.bits_w, wage.bits_a, wage.bits_g, wage.bits_e) == (2, 8, 8, 8)


def test_apply_sets_parses_each_field_type():
    """--set values become the field's type; lists, none and booleans have spellings."""
    cfg = apply_sets(load_recipe("lenet5-fmnist"), [
        "per_class=20", "lr_milestones=3,4", "data_dir=/x", "lr=1", "stochastic_errors=true",
        "device=cpu"])
    assert (cfg.per_class, cfg.lr_milestones, cfg.data_dir, cfg.lr, cfg.stochastic_errors) == (
        20, (3, 4), "/x", 1.0, True)
    assert isinstance(cfg.lr, float)
    assert apply_sets(cfg, ["per_class=none", "lr_milestones="]).per_class is None


@pytest.mark.parametrize("sets, words", [
    (["foo=1"], "unknown field 'foo'"),
    (["epochs=1.5"], "expected integer"),
    (["stochastic_errors=maybe"], "expected true/false"),
    (["bits_w=1"], "bits_w=1"),
    (["bits_a=17"], "bits_a=17"),
    (["norm=l3"], "unknown norm"),
    (["lr_milestones=5,3"], "increasing"),
    (["model=lenet5", "data=cifar10"], "does not take"),
    (["bits_w=32"], "int backend needs integer"),
    (["norm=l2"], "L1 batch norm only"),
])
def test_bad_sets_are_one_line_user_errors(sets, words):
    """Every bad value is a UserError with a one-line message naming the problem."""
    with pytest.raises(UserError) as err:
        apply_sets(load_recipe("lenet5-fmnist"), sets)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unknown_recipe_lists_the_recipes(tmp_path):
    """An unknown name names every packaged recipe; a partial file names the missing fields."""
    with pytest.raises(UserError, match="lenet5-fmnist, lenet5-fmnist-paper"):
        load_recipe("nope")
    partial = tmp_path / "mine.toml"
    partial.write_text('model = "mlp"\n')
    with pytest.raises(UserError, match="lacks field"):
        load_recipe(partial)
    full = tmp_path / "full.json"
    full.write_text(load_recipe("mlp-fmnist").to_json())
    assert load_recipe(full) == load_recipe("mlp-fmnist")


# --- checkpoints -------------------------------------------------------------------------------

def test_integer_optimizer_state_round_trips(tmp_path):
    """A saved and reloaded QSGD keeps int 'store_exp' and int64 'velocity' exactly, and steps on
    exactly as the original (torch's load_state_dict alone would cast velocity to float32)."""
    from qtrain.run import build, load_checkpoint, save_checkpoint
    from qtrain.train import train_epoch

    cfg = dataclasses.replace(load_recipe("mlp-fmnist"), batch_size=16)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.uint8)

    def run_epoch(model, opt, epoch):
        train_epoch(model, opt, images, labels, batch_size=16, seed=0, epoch=epoch)

    model, opt = build(cfg, (28, 28, 1))
    run_epoch(model, opt, 0)
    save_checkpoint(tmp_path / "c.pt", model, opt, 1, cfg, [], 0.0)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    model2, opt2 = build(dataclasses.replace(cfg, seed=cfg.seed), (28, 28, 1))
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    model2.qstate.step = ckpt["step"]
    for p, q in zip(model.parameters(), model2.parameters()):
        a, b = opt.state[p], opt2.state[q]
        assert type(b["store_exp"]) is int and b["store_exp"] == a["store_exp"]
        assert b["velocity"].dtype == torch.int64 and torch.equal(a["velocity"], b["velocity"])
    run_epoch(model, opt, 1)
    run_epoch(model2, opt2, 1)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


# --- resume after a real kill ------------------------------------------------------------------

def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A run SIGKILLed during epoch 2 and resumed with --resume ends with the same weights,
    optimizer state and step, bit for bit, as the same run left alone."""
    data = fake_mnist(tmp_path / "data", 100, 10)
    env = qtrain_env(tmp_path)
    args = [sys.executable, "-m", "qtrain.cli", "--data-dir", str(data), "--set",
            "per_class=100", "--batch-size", "8", "--epochs", "3", "--no-download"]
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whole = subprocess.Popen([*args, "--out", str(tmp_path / "whole")], **quiet)
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen([*args, "--out", str(killed_dir)], **quiet)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # inside epoch 2 (checked below)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert metrics.read_text().count("\n") == 1, "killed too late: epoch 2 had finished"
    assert _final_state(killed_dir)["epoch"] == 1

    out = subprocess.run([sys.executable, "-m", "qtrain.cli", "--resume", str(killed_dir)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout and "after epoch 1" in out.stdout
    assert whole.wait(timeout=300) == 0

    a, b = _final_state(tmp_path / "whole"), _final_state(killed_dir)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["velocity"], b["optimizer"]["state"][i]["velocity"])
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    whole_lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text()
                   .splitlines()]
    assert [m["test_error"] for m in lines] == [m["test_error"] for m in whole_lines]
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in whole_lines]
