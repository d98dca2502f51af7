"""The qtrain command, run as a user would: through a subprocess."""

import json
import subprocess
import sys

import pytest

from qkernels.opcount import table4_counts


def qtrain(*args):
    return subprocess.run([sys.executable, "-m", "qtrain.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_version():
    """qtrain --version names the package version."""
    from qtrain import __version__

    out = qtrain("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qtrain {__version__}"


def test_ops_json_matches_table4_and_kernel_counts():
    """qtrain ops --json reports Table IV's formulas and the kernels' counted operations."""
    out = qtrain("ops", "16x3x4x4", "32x5", "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert [r["shape"] for r in reports] == [[16, 3, 4, 4], [32, 5]]
    conv = reports[0]
    assert conv["counts"]["l1bn_table4"] == table4_counts("L1BN", 256, 3)
    assert conv["counts"]["l1bn_kernel"]["total"]["DIV"] == 3 + 1  # one per channel, one per call
    assert conv["counts"]["l1bn_kernel"]["total"]["SQRT"] == 0
    saving = conv["asic"]["int8"]["saving"]["table4"]
    assert 0 < saving["time"] < 1 and 0 < saving["energy"] < 1


def test_ops_tables_for_people():
    """Without --json, qtrain ops prints Markdown tables naming every counted source."""
    out = qtrain("ops", "8x2x3x3")
    assert out.returncode == 0, out.stderr
    for label in ("L1BN int8 kernel", "L2BN reference", "L1BN Table IV", "L2BN Table IV"):
        assert label in out.stdout


@pytest.mark.parametrize("args, words", [
    (("ops", "12xfoo"), "shape"),
    (("ops", "0x3"), "shape"),
    (("ops", "1x3x1x1"), "more than 1 value per channel"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    """A user error prints one line naming the problem, exits with 2, and shows no traceback."""
    out = qtrain(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in out.stderr


def test_no_command_prints_help_and_exits_2():
    """qtrain with nothing to do shows its usage and fails."""
    out = qtrain()
    assert out.returncode == 2 and "usage: qtrain" in out.stderr


# --- training through the command line --------------------------------------------------------

import dataclasses  # noqa: E402


@pytest.fixture
def fake_data(tmp_path, fake_mnist):
    """A --data-dir with tiny Fashion-MNIST-shaped IDX files (30 train, 5 test per class)."""
    return fake_mnist(tmp_path / "data", 30, 5)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The search sees --data-dir and the system directory only: no $QTRAIN_DATA, empty cache."""
    monkeypatch.delenv("QTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")


def test_train_end_to_end_writes_the_run_directory(tmp_path, fake_data, env):
    """qtrain trains on --data-dir, names the data source on its first line, prints one line per
    epoch and leaves config.json (reproducing the run alone), metrics.jsonl (one line per
    epoch), summary.json, checkpoint.pt and curves.png."""
    import torch

    from qtrain.config import RunConfig, load_recipe

    run = tmp_path / "run"
    out = qtrain("--data-dir", str(fake_data), "--set", "per_class=20", "--epochs", "2",
                 "--bits", "8", "--norm", "l1", "--no-download", "--out", str(run))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("data: --data-dir") and str(fake_data) in lines[0]
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert "epoch 2/2" in out.stderr  # the progress bar

    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg == dataclasses.replace(load_recipe("lenet5-fmnist"), epochs=2, per_class=20,
                                      data_dir=str(fake_data))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"train_loss", "test_error", "seconds", "images_per_s", "quant", "store"} <= set(m)
        assert m["store"] and all(v["steps"] > 0 and v["raised"] >= 0
                                  for v in m["store"].values())
        assert 0 <= m["test_error"] <= 1 and m["images_per_s"] > 0
        stats = [s for layer in m["quant"].values() for s in layer.values()]
        assert stats and all(s["total"] > 0 or s["saturated"] == 0 for s in stats)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_error"] == metrics[-1]["test_error"]
    assert summary["best_test_error"] == min(m["test_error"] for m in metrics)
    assert (summary["bits"], summary["norm"], summary["backend"]) == ("W8A8G8E8", "l1", "int")
    assert str(fake_data) in summary["data_source"] and summary["wall_s"] > 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 2  # 2 epochs of 200 images in batches of 128
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left

    again = tmp_path / "again"  # the saved config alone repeats the run, bit for bit
    out = qtrain("--recipe", str(run / "config.json"), "--out", str(again), "--no-download")
    assert out.returncode == 0, out.stderr
    ckpt2 = torch.load(again / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, ckpt2["model"][k]) for k, v in ckpt["model"].items())


def _one_line_exit_2(out, words):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, words", [
    (("--bits", "1"), "bits_w=1 is not a supported width"),
    (("--bits", "17"), "bits_w=17"),
    (("--bits", "33"), "bits_w=33"),
    (("--bits-e", "0"), "bits_e=0"),
    (("--norm", "l3"), "argument --norm: invalid choice"),
    (("--backend", "gpu"), "argument --backend: invalid choice"),
    (("--model", "alexnet"), "argument --model: invalid choice"),
    (("--data", "imagenet"), "argument --data: invalid choice"),
    (("--recipe", "nope"), "unknown recipe 'nope'"),
    (("--set", "nope=1"), "unknown field 'nope'"),
    (("--set", "epochs=two"), "--set epochs='two': expected integer"),
    (("--set", "norm=l3"), "unknown norm"),
    (("--epochs", "x"), "argument --epochs: invalid int value"),
    (("--bits-w", "32"), "int backend needs integer"),
    (("train", "extra"), "unrecognized arguments"),
])
def test_bad_training_input_is_one_line_and_exit_2(args, words, tmp_path, env):
    """Bad flags, recipes and --set values: one line, exit 2, no traceback, nothing written."""
    _one_line_exit_2(qtrain(*args, "--out", str(tmp_path / "run")), words)
    assert not (tmp_path / "run").exists()


def test_unwritable_out_is_one_line(tmp_path, env):
    """An --out that cannot be created (under a regular file: fails even for root)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_exit_2(qtrain("--out", str(blocker / "run")), "cannot write the run directory")


def test_resume_of_a_non_run_is_one_line(tmp_path, env):
    _one_line_exit_2(qtrain("--resume", str(tmp_path)), "is not a run directory")


@pytest.mark.parametrize("args, words", [
    (("--bits", "4"), "bits_w=4 conflicts with the run's bits_w=8"),
    (("--set", "lr=0.5"), "lr=0.5 conflicts"),
    (("--model", "mlp"), "model='mlp' conflicts"),
    (("--recipe", "mlp-fmnist"), "drop --recipe"),
])
def test_resume_with_conflicting_flags_is_one_line(tmp_path, env, args, words):
    """Flags given with --resume must agree with the run's saved config."""
    from qtrain.config import load_recipe

    (tmp_path / "config.json").write_text(load_recipe("lenet5-fmnist").to_json())
    _one_line_exit_2(qtrain("--resume", str(tmp_path), *args), words)


def test_missing_data_is_one_line(tmp_path, env):
    """An empty --data-dir with no other source and downloads off names where it looked."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = qtrain("--data", "mnist", "--model", "mlp", "--data-dir", str(empty), "--no-download",
                 "--out", str(tmp_path / "run"))
    _one_line_exit_2(out, "not found")
    assert str(empty) in out.stderr
    assert not (tmp_path / "run").exists()
    _one_line_exit_2(qtrain("--data-dir", str(tmp_path / "absent"), "--no-download", "--out",
                            str(tmp_path / "run")), "is not a directory")


def test_corrupt_data_is_one_line(tmp_path, fake_data, env):
    """A truncated IDX file in --data-dir is a one-line error naming the file."""
    path = fake_data / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    out = qtrain("--data-dir", str(fake_data), "--no-download", "--out", str(tmp_path / "run"))
    _one_line_exit_2(out, "truncated IDX payload")


@pytest.mark.parametrize("args, words", [
    (("stats", "/nonexistent/run"), "run"),
    (("sweep", "--bits", "8,x", "--out", "/tmp/qtrain-sweep-never"), "bits"),
    *[(("sweep", f"--shard={k}", "--out", "/tmp/qtrain-sweep-never"), "is not k/n")
      for k in ("0/2", "3/2", "x", "1/0")],
    (("ops", "--model", "lenet5", "128x6"), "either"),
])
def test_subcommand_errors_are_one_line(args, words):
    """stats, sweep (bad lists, bad --shard K/N) and ops report bad input as one line with exit
    code 2."""
    out = qtrain(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0].lower() and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["ops", "stats", "sweep", "compare"])
def test_subcommand_help(command):
    """Every subcommand documents itself."""
    out = qtrain(command, "--help")
    assert out.returncode == 0 and f"qtrain {command}" in out.stdout


# --- non-finite numbers -------------------------------------------------------------------------

def _float_fields():
    import typing

    from qtrain.config import RunConfig

    return [name for name, tp in typing.get_type_hints(RunConfig).items() if tp is float]


def test_float_fields_are_the_ones_tested():
    """The non-finite tests below cover every float field of RunConfig (found from its types)."""
    assert set(_float_fields()) >= {"lr", "lr_gamma", "momentum", "weight_decay"}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", _float_fields())
def test_non_finite_set_values_are_one_line(tmp_path, env, field, value):
    """Every float field given nan, inf or -inf through --set: one line naming it, exit 2, no
    traceback, nothing written."""
    _one_line_exit_2(qtrain("--set", f"{field}={value}", "--out", str(tmp_path / "run")),
                     f"{field}={value} is not a finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_float_flags_are_one_line(tmp_path, env, value):
    """Every float flag (--lr) rejects non-finite values when the arguments are parsed."""
    from qtrain.cli import build_parser

    flags = [a.option_strings[-1] for a in build_parser()._actions
             if getattr(a.type, "__name__", "") in ("float", "finite_float")]
    assert flags == ["--lr"]
    for flag in flags:
        _one_line_exit_2(qtrain(f"{flag}={value}", "--out", str(tmp_path / "run")),
                         f"argument {flag}: {value} is not a finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix, text", [
    (".json", '"momentum": NaN'),
    (".toml", "lr_gamma = inf"),
])
def test_non_finite_recipe_values_are_one_line(tmp_path, env, suffix, text):
    """Recipe files and run configs (config.json: Python's json reads NaN and Infinity) are
    checked as --set values are."""
    from qtrain.config import load_recipe

    cfg = load_recipe("lenet5-fmnist").to_dict()
    field, _, raw = text.partition("=" if suffix == ".toml" else ":")
    del cfg[field.strip().strip('"')]
    if suffix == ".json":
        body = json.dumps(cfg)[:-1] + ", " + text + "}"
    else:
        body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items() if v is not None)
        body += text + "\n"
    recipe = tmp_path / f"recipe{suffix}"
    recipe.write_text(body)
    name = field.strip().strip('"')
    _one_line_exit_2(qtrain("--recipe", str(recipe), "--out", str(tmp_path / "run")),
                     f"{name}={raw.strip().lower()} is not a finite number")


def test_learning_rate_schedule_must_stay_finite():
    """A finite lr_gamma whose milestones take the rate out of range is one line too."""
    from qtrain.config import UserError, load_recipe

    base = load_recipe("lenet5-fmnist")
    for gamma in (1e200, 1e-200):
        with pytest.raises(UserError, match="not a positive finite number") as err:
            dataclasses.replace(base, lr=1e-200 if gamma < 1 else 0.1, lr_gamma=gamma,
                                lr_milestones=(1, 2))
        assert "\n" not in str(err.value)


_MMAPPED = """
import ctypes, sys
import numpy as np
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    from qtrain import memory
    assert memory.keep_freed_memory()
block = np.ones(1 << 26, np.uint8)  # 64 MiB
print(libc.mallinfo2().hblkhd >= block.nbytes)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_qtrain_program_keeps_freed_memory_in_the_heap(monkeypatch):
    """glibc maps a 64 MiB array with mmap (returned to the system when freed, faulted in
    again on the next allocation) unless the thresholds are raised, as ``qtrain`` does at
    start; run in fresh processes, so this one's allocator stays as it was."""
    mapped = {how: subprocess.run([sys.executable, "-c", _MMAPPED, how], capture_output=True,
                                  text=True, check=True).stdout.strip()
              for how in ("default", "keep")}
    assert mapped == {"default": "True", "keep": "False"}
    from qtrain import cli

    calls = []
    monkeypatch.setattr(cli.memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "main", lambda: 0)
    with pytest.raises(SystemExit):
        cli.entry()
    assert calls == [1]
