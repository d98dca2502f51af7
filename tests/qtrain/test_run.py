"""Run configs, recipes, checkpoints and exact resumption (qtrain.config, qtrain.run)."""

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain import config, models, quant
from qtrain.config import DEFAULTED, RunConfig, UserError, apply_sets, load_recipe, recipe_names


def qtrain_env(tmp_path: Path) -> dict:
    """No $QTRAIN_DATA and an empty user cache: only --data-dir (or the system) holds data."""
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["NUMBA_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"  # two runs share the cores
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]),
                                         env.get("PYTHONPATH", "")])
    return env


# --- configs and recipes ---------------------------------------------------------------------

def test_names_are_defined_once():
    """The names config validates (torch-free, from qtrain.spec) are the ones the models,
    quantizers and data loaders use: the same objects, and a builder for every model name."""
    from qtrain import data, spec
    assert config.MODELS is spec.MODELS and tuple(models.MODELS) == spec.MODELS
    assert config.NORMS is models.NORMS is spec.NORMS
    assert config.BACKENDS is quant.BACKENDS is spec.BACKENDS
    assert config.WEIGHT_EXPS is quant.WEIGHT_EXPS is spec.WEIGHT_EXPS
    assert data.DATASETS == tuple(config.DATASETS)


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
    assert paper.model == wage.model == "lenet5-paper"  # the paper's and WAGE's own network
    assert (wage.scheme, wage.norm, wage.momentum) == ("wage", "none", 0.0)  # WAGE's rules
    assert [wage.lr_at(e) for e in (0, 59, 60, 74, 75, 89)] == [8, 8, 1, 1, 0.125, 0.125]
    assert load_recipe("wage-2888-l1bn") == dataclasses.replace(wage, norm="l1")
    assert paper.weight_decay == 0.0


def test_weight_decay_is_a_checked_field():
    cfg = apply_sets(load_recipe("lenet5-fmnist"), ["weight_decay=5e-4"])
    assert cfg.weight_decay == 5e-4 and load_recipe("lenet5-fmnist").weight_decay == 0.0
    for bad in ("-1e-4", "1.5", "nan"):
        with pytest.raises(UserError, match="weight_decay"):
            apply_sets(load_recipe("lenet5-fmnist"), [f"weight_decay={bad}"])


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
    with pytest.raises(UserError, match="lenet5-fmnist, lenet5-fmnist-lowbit, lenet5-fmnist-paper"):
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
        assert_same_entries(a, b, "optimizer state")
    run_epoch(model, opt, 1)
    run_epoch(model2, opt2, 1)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


# --- resume after a real kill ------------------------------------------------------------------

def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_entries(a: dict, b: dict, where: str) -> None:
    """The same keys, and equal values: tensors bit for bit with the same dtype, the rest ==."""
    assert a.keys() == b.keys(), where
    for key, x in a.items():
        y = b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, (where, key)
            assert torch.equal(x, y), (where, key)
        else:
            assert type(x) is type(y) and x == y, (where, key)


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Two checkpoints hold the same training state, bit for bit: every model parameter and
    buffer, every optimizer state entry of every parameter (QSGD: the weight store's
    ``store_exp`` and the int64 ``velocity``), the param groups, the step and the epoch."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert_same_entries(a["model"], b["model"], "model")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a["optimizer"]["param_groups"][0]["params"])
    for i in sa:
        assert {"store_exp", "velocity"} <= set(sa[i]), sa[i].keys()
        assert_same_entries(sa[i], sb[i], f"optimizer state of parameter {i}")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["config"] == b["config"]


RUN_ARGS = ["--set", "per_class=100", "--batch-size", "8", "--epochs", "3", "--no-download"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fake_mnist):
    """The reference: the resume tests' run (fake data, 3 epochs) left alone, started in the
    background; ``wait()`` gives its run directory once it has finished."""
    root = tmp_path_factory.mktemp("resume")
    data = fake_mnist(root / "data", 100, 10)
    env = qtrain_env(root)
    out = root / "whole"
    log = root / "whole.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "qtrain.cli", "--data-dir", str(data),
                                 *RUN_ARGS, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)

    class Whole:
        def wait(self) -> Path:
            assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
            return out

    yield Whole(), data, env
    if proc.poll() is None:
        proc.kill()
        proc.wait()


#: Run as ``python -c``: qtrain's command line, with torch.save replaced by one that, on the
#: checkpoint write of epoch KILL_AT, writes the first half of the checkpoint's bytes to the
#: file it was given (checkpoint.pt's temporary file), fsyncs and SIGKILLs its own process.
KILL_INSIDE_SAVE = """
import io, os, signal, sys
import torch
import qtrain.cli
KILL_AT = int(os.environ["KILL_AT"])
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(obj.get("epoch") if isinstance(obj, dict) else None)
    if len(calls) == KILL_AT:
        assert obj["epoch"] == KILL_AT, obj.keys()
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.exit(qtrain.cli.main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path, uninterrupted):
    """A run SIGKILLed during epoch 2 and resumed with --resume ends with the same weights,
    buffers, optimizer state (every entry: store_exp, velocity) and step, bit for bit, as the
    same run left alone."""
    whole, data, env = uninterrupted
    args = [sys.executable, "-m", "qtrain.cli", "--data-dir", str(data), *RUN_ARGS]
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    whole_dir = whole.wait()

    a, b = _final_state(whole_dir), _final_state(killed_dir)
    assert a["epoch"] == b["epoch"] == 3
    assert_same_checkpoint(a, b)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    whole_lines = [json.loads(x) for x in (whole_dir / "metrics.jsonl").read_text()
                   .splitlines()]
    assert [m["test_error"] for m in lines] == [m["test_error"] for m in whole_lines]
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in whole_lines]

    # provenance: the command that started the run, then the resume from epoch 1
    summary = json.loads((killed_dir / "summary.json").read_text())
    first, second = summary["provenance"]
    assert first["command"] == shlex.join(["qtrain", *args[3:], "--out", str(killed_dir)])
    assert second["command"] == shlex.join(["qtrain", "--resume", str(killed_dir)])
    assert (first["from_epoch"], second["from_epoch"]) == (0, 1)
    assert summary["command"] == first["command"]
    commit = re.compile(r"[0-9a-f]{40}(\+dirty)?")
    for seg in (first, second):
        assert seg["commit"] is None or commit.fullmatch(seg["commit"]), seg
    assert summary["commit"] == first["commit"] == second["commit"]
    assert b["provenance"] == summary["provenance"]


def test_source_commit_names_the_checkout_and_its_edits(tmp_path):
    """A clean checkout gives its HEAD, edited tracked files add "+dirty", untracked files do
    not, and a directory outside git gives None."""
    from qtrain.run import source_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert source_commit(repo) == head
    (repo / "new.py").write_text("")
    assert source_commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert source_commit(repo) == head + "+dirty"
    assert source_commit(tmp_path / "elsewhere") is None


def test_kill_inside_checkpoint_write_keeps_previous_checkpoint(tmp_path, uninterrupted):
    """A run SIGKILLed inside the checkpoint write of epoch 2 (half the bytes written to the
    temporary file) leaves epoch 1's checkpoint.pt whole and loadable, metrics.jsonl and
    summary.json saying epoch 1 as it does, and the partial file under a temporary name that
    nothing reads; --resume then finishes with the same state, bit for bit (every optimizer
    state entry), as the run left alone."""
    from qtrain.run import load_checkpoint

    whole, data, env = uninterrupted
    run_dir = tmp_path / "killed"
    victim = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_SAVE, "--data-dir", str(data), *RUN_ARGS,
         "--out", str(run_dir)],
        env={**env, "KILL_AT": "2"}, capture_output=True, text=True, timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim.stderr

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")  # loads: the previous checkpoint is whole
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert ckpt["step"] == -(-1000 // 8)  # one epoch of 1000 images in batches of 8
    partial = [p for p in run_dir.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert len(partial) == 1 and partial[0].suffix == ".tmp", sorted(run_dir.iterdir())
    assert 0 < partial[0].stat().st_size < (run_dir / "checkpoint.pt").stat().st_size
    with pytest.raises(Exception):  # it is the half-written epoch-2 checkpoint
        torch.load(partial[0], map_location="cpu", weights_only=True)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt", "config.json", "curves.png", "metrics.jsonl", "summary.json"]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(ckpt["history"]))  # the checkpoint's epoch 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 1
    assert summary["final_test_error"] == ckpt["history"][-1]["test_error"]

    out = subprocess.run([sys.executable, "-m", "qtrain.cli", "--resume", str(run_dir)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "after epoch 1" in out.stdout
    assert not list(run_dir.glob(".*.tmp")), "the resume leaves the killed write's partial file"
    whole_dir = whole.wait()
    a, b = _final_state(whole_dir), _final_state(run_dir)
    assert a["epoch"] == b["epoch"] == 3
    assert_same_checkpoint(a, b)
    resumed = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    alone = [json.loads(x) for x in (whole_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "lr", "train_loss", "train_error", "test_error", "quant", "store"):
        assert [m[key] for m in resumed] == [m[key] for m in alone], key
