"""Data-parallel training (qtrain.distributed) is bit-identical at every world size: the same
weights, optimizer state, running statistics and metrics after training on 1, 2, 3 or 4
processes (gloo on loopback, tiny data)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import re
import socket

import numpy as np
import pytest
import torch

from qtrain import distributed as dist
from qtrain.config import load_recipe

from .dist_worker import cli_worker, train_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """100 training images (batches of 24: four full, one of 4) and 30 test images."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("dist") / "tiny.npz"
    y_train = rng.integers(0, 10, 100)
    x_train = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    x_train[:, 4:8, :] = (y_train * 25)[:, None, None]  # something to learn
    np.savez(path, x_train=x_train, y_train=y_train,
             x_test=rng.integers(0, 256, (30, 28, 28)).astype(np.uint8),
             y_test=rng.integers(0, 10, 30))
    return str(path)


def spawn(target, world_size: int, *args, **kwargs) -> None:
    """``target(rank, world_size, port, *args, **kwargs)`` in ``world_size`` spawned
    processes on a free loopback port; every one must exit 0."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, *args), kwargs=kwargs)
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _train(world_size: int, cfg, data: str, out) -> dict:
    path = str(out / f"w{world_size}.pt")
    spawn(train_worker, world_size, dataclasses.asdict(cfg), data, path)
    return torch.load(path, weights_only=False)


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


CASES = {
    # the fused conv blocks (int8 GEMMs) and fused linear blocks, int backend
    "lenet5-int8": ({"model": "lenet5", "backend": "int"}, (2, 4)),
    # the emulate backend's CPU path; 16-bit codes: int16 L1BN, the float GEMM path
    "mlp-emulate16": ({"model": "mlp", "backend": "emulate", "bits_w": 16, "bits_a": 16,
                       "bits_g": 16, "bits_e": 16, "stochastic_errors": True}, (3,)),
    # the mean weight exponent at low widths; stochastic errors (fused and container paths)
    "lenet5-w4-mean": ({"model": "lenet5", "backend": "int", "bits_w": 4, "bits_a": 6,
                        "weight_exp": "mean", "stochastic_errors": True}, (3,)),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "lenet5-int8" else
                                               pytest.mark.slow) for c in CASES])
def test_world_sizes_give_identical_networks(case, tiny, tmp_path):
    changes, sizes = CASES[case]
    cfg = dataclasses.replace(load_recipe("lenet5-fmnist"), epochs=2, batch_size=24, lr=0.05,
                              **changes)
    one = _train(1, cfg, tiny, tmp_path)
    assert one["step"] == 10 and one["metrics"][-1]["train_loss"] > 0
    for n in sizes:
        _assert_same(_train(n, cfg, tiny, tmp_path), one, f"world size {n}")


def test_shards_cover_a_batch_in_order():
    for n in (1, 4, 5, 24, 25):
        for size in (1, 2, 3, 4, 7):
            parts = [dist.shard(n, dist.World(r, size)) for r in range(size)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))
            lengths = [s.stop - s.start for s in parts]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


# --- the command line: qtrain --nproc, resume at another world size, a process that dies --------

def _env(tmp_path) -> dict:
    import os
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("QTRAIN_DATA", "WORLD_SIZE", "RANK")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]),
                                         env.get("PYTHONPATH", "")])
    return env


def _qtrain(args, env, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qtrain", *args], env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def _state(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"], "step": ckpt["step"],
            "metrics": [{k: v for k, v in m.items()
                         if k not in ("seconds", "images_per_s", "world_size")}
                        for m in ckpt["history"]]}


@pytest.mark.slow  # three qtrain runs, one of them on two processes
def test_nproc_and_resume_at_another_world_size_are_bit_identical(tmp_path, fake_mnist):
    import json

    data = fake_mnist(tmp_path / "data", 20, 5)
    env = _env(tmp_path)
    args = ["--data-dir", str(data), "--no-download", "--batch-size", "16", "--set",
            "per_class=20"]
    one = _qtrain([*args, "--epochs", "3", "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _qtrain([*args, "--epochs", "2", "--nproc", "2", "--out", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes" in two.stdout
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the third epoch on one process, continuing the two-process run
    more = _qtrain(["--resume", str(tmp_path / "two"), "--epochs", "3"], env)
    assert more.returncode == 0, more.stderr[-2000:]
    _assert_same(_state(tmp_path / "two"), _state(tmp_path / "one"), "resumed")
    lines = [json.loads(s) for s in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["world_size"] for m in lines] == [2, 2, 1]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [s["world_size"] for s in summary["provenance"]] == [2, 1]


def test_each_process_of_a_run_leaves_the_group_before_it_exits(tmp_path, fake_mnist):
    data = fake_mnist(tmp_path / "data", 20, 5)
    spawn(cli_worker, 2, ["--data-dir", str(data), "--no-download", "--batch-size", "16",
                          "--set", "per_class=20", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / "summary.json").is_file()


def test_a_process_of_a_run_exits_without_the_interpreters_teardown(monkeypatch):
    from qtrain import cli

    class Exited(Exception):
        pass

    def _exit(status):
        raise Exited(status)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.memory, "keep_freed_memory", lambda: True)  # this process's as is
    monkeypatch.setattr(cli.os, "_exit", _exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(Exited) as one_of_two:
        cli.entry()
    assert one_of_two.value.args == (3,)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as alone:
        cli.entry()
    assert alone.value.code == 3


def test_a_process_that_dies_stops_the_others_with_one_line(tmp_path, fake_mnist):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = fake_mnist(tmp_path / "data", 40, 5)
    out = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "qtrain", "--data-dir", str(data), "--no-download",
             "--set", "per_class=40", "--batch-size", "8", "--epochs", "50", "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGKILL)
    _, err = procs[0].communicate(timeout=300)
    procs[1].wait()
    assert procs[0].returncode == 2
    lines = [s for s in re.split(r"[\r\n]", err) if s.startswith("qtrain:")]
    assert len(lines) == 1 and "rank 0: another process of the run stopped" in lines[0], err
    assert "Traceback" not in err and f"qtrain --resume {out}" in lines[0]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)  # intact, and resumable
    assert ckpt["epoch"] >= 1


@pytest.mark.parametrize("value,words", [("0", "at least 1"), ("x", "whole number"),
                                         ("-2", "at least 1")])
def test_bad_nproc_is_one_line(value, words, capsys):
    from qtrain import cli

    assert cli.main(["--nproc", value, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "--nproc" in err[0]


def test_backend_and_device_of_each_process(monkeypatch):
    """gloo unless a float network has a GPU per process (then NCCL); a bare ``cuda`` on several
    processes is the GPU of the process's LOCAL_RANK, modulo the machine's GPUs."""
    assert dist.backend_for("cpu", quantized=False) == "gloo"
    assert dist.process_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.backend_for("cuda", quantized=False) == "nccl"
    assert dist.backend_for("cuda", quantized=True) == "gloo"  # host-side integer collectives
    assert dist.backend_for("cuda:0", quantized=False) == "gloo"  # both on one GPU
    assert dist.process_device("cuda") == "cuda:1"
    assert dist.process_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share two GPUs
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.backend_for("cuda", quantized=False) == "gloo"
    assert dist.process_device("cuda") == "cuda:1"


def test_world_size_limits_are_one_line_errors():
    from qtrain.config import UserError
    from qtrain.run import _check_world

    cfg = load_recipe("lenet5-fmnist")
    world = dist.World(0, 4)
    _check_world(cfg, world, 60000)  # 60000 = 468 * 128 + 96: every process gets images
    with pytest.raises(UserError, match="last batch of each epoch holds 2 images"):
        _check_world(cfg, world, 128 * 3 + 2)
    with pytest.raises(UserError, match="smaller than the 4 processes"):
        _check_world(dataclasses.replace(cfg, batch_size=3), world, 60000)
    _check_world(dataclasses.replace(cfg, backend="emulate", device="cuda"), world, 60000)
    _check_world(dataclasses.replace(cfg, batch_size=3), dist.World(), 60000)  # one process
    with pytest.raises(UserError, match="norm_input_exp channel is not supported across"):
        _check_world(dataclasses.replace(cfg, norm_input_exp="channel"), world, 60000)


@pytest.mark.parametrize("n,cut", [(10, 3), (7, 0), (12, 12)])
def test_stochastic_rounding_of_a_split_tensor_equals_the_whole(n, cut):
    """Element ``i`` of a share starting at ``first`` takes the stream's element ``first + i``;
    with the whole tensor's exponent the shares round as the whole does."""
    from qkernels import QTensor
    from qkernels.ieee import quantize_f32
    from qkernels.quant import quantize_stochastic
    from qkernels.rng import random_top_bits

    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 5)) * 100).astype(np.float32)
    kw = {"seed": 3, "step": 7, "tensor_id": 2}
    whole, e, _ = quantize_f32(x, 6, stochastic=True, **kw)
    parts = [quantize_f32(p, 6, stochastic=True, exp=e, first=f, **kw)[0]
             for p, f in ((x[:cut], 0), (x[cut:], cut * 5)) if len(p)]
    assert np.array_equal(np.concatenate(parts), whole)
    codes = QTensor(rng.integers(-2000, 2000, (n, 5)), -3)
    q, _ = quantize_stochastic(codes, 6, **kw)
    parts = [quantize_stochastic(QTensor(c, -3), 6, exp=q.exp, first=f, **kw)[0].q
             for c, f in ((codes.q[:cut], 0), (codes.q[cut:], cut * 5)) if len(c)]
    assert np.array_equal(np.concatenate(parts), q.q)
    assert np.array_equal(random_top_bits(1, 2, 3, 4, 24, first=6),
                          random_top_bits(1, 2, 3, 10, 24)[6:])


@pytest.mark.slow
def test_a_float_run_on_two_processes_uses_ddp(tmp_path, fake_mnist):
    """bits 32 trains under DistributedDataParallel (not bit-identical across world sizes:
    float sums; documented) and writes one run directory."""
    import json

    data = fake_mnist(tmp_path / "data", 10, 5)
    out = tmp_path / "float"
    run = _qtrain(["--data-dir", str(data), "--no-download", "--set", "per_class=10",
                   "--batch-size", "20", "--epochs", "1", "--bits", "32", "--norm", "l2",
                   "--backend", "emulate", "--nproc", "2", "--out", str(out)], _env(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["bits"] == "W32A32G32E32"
    assert 0 <= summary["final_test_error"] <= 1


def test_nproc_with_a_bad_config_is_one_line(tmp_path):
    """Every process finds the error; rank 0 alone says it."""
    run = _qtrain(["--nproc", "2", "--set", "lr=-1", "--out", str(tmp_path / "x")],
                  _env(tmp_path))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "lr=-1" in lines[0], run.stderr
