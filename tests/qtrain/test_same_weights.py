"""scripts/same_weights.py: final checkpoints compared bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def same_weights(*runs):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "same_weights.py"),
                           *map(str, runs)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fake_mnist):
    """A one-epoch int8 L1BN run of lenet5 on tiny Fashion-MNIST-shaped data."""
    root = tmp_path_factory.mktemp("same-weights")
    data = fake_mnist(root / "data", 30, 5)
    out = subprocess.run([sys.executable, "-m", "qtrain.cli", "--data-dir", str(data), "--set",
                          "per_class=10", "--epochs", "1", "--bits", "8", "--norm", "l1",
                          "--no-download", "--out", str(root / "run")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return root / "run"


def test_equal_runs_and_one_changed_bit(run_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    out = same_weights(run_dir, twin)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["equal"] and [r["differ_from_first"] for r in report["runs"]] == [[], []]
    assert report["runs"][1]["tensors"] >= 10  # weights, running statistics, velocities

    # flip the lowest bit of one weight of the copy: named, exit status 1
    ckpt = torch.load(twin / "checkpoint.pt", map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["model"] if k.endswith("weight"))
    w = ckpt["model"][name]
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf"), dtype=w.dtype))
    torch.save(ckpt, twin / "checkpoint.pt")
    out = same_weights(run_dir, twin)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert not report["equal"] and report["runs"][1]["differ_from_first"] == [f"model/{name}"]


def test_not_a_run_directory(tmp_path):
    out = same_weights(tmp_path, tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "qtrain --out" in out.stderr
