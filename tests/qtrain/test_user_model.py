"""``--model package.module:function``: your own torch network, converted and trained from the
command line; each bad model is one line and exit 2."""

import copy
import dataclasses
import json
import textwrap

import numpy as np
import pytest
import torch

from qtrain.config import load_recipe
from qtrain.run import build
from qtrain.train import train_epoch

from .test_user_data import K, make_npz, one_line_exit_2, run_cli

MODELS_PY = textwrap.dedent('''
    from torch import nn

    def small():
        """A float CNN with a folded bias (before BN), a kept conv bias and a biased classifier."""
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(6, 3))  # 8x8 images: 6 features

    def ten_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def sized(num_classes=10, in_channels=3, height=0, width=0, depth=2):
        """Told the data's sizes (8x8 grayscale, 3 classes here); depth keeps its default."""
        return nn.Sequential(nn.Conv2d(in_channels, depth, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(depth * (height - 2) * (width - 2), num_classes))

    def broken():
        raise RuntimeError("no weights file")

    def not_a_module():
        return [1, 2]

    def gelu():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.GELU())

    NOT_CALLABLE = 3
''')


@pytest.fixture
def models(tmp_path, monkeypatch):
    """mymodels.py in the current directory (where --model looks first)."""
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_trains_and_resumes_your_model(models, capsys):
    data = make_npz(models / "d.npz")
    out = models / "run"
    status, stdout, err = run_cli(capsys, "--model", "mymodels:small", "--data", str(data),
                                  "--epochs", "1", "--batch-size", "10", "--out", str(out))
    assert status == 0, err
    assert "mymodels:small" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mymodels:small"
    status, _, err = run_cli(capsys, "--resume", str(out), "--epochs", "2")
    assert status == 0, err
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 2


def test_your_model_is_bit_identical_on_both_backends(models):
    """Two steps of the converted network (its biases quantized) on int and emulate."""
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    y = np.arange(20) % K
    states = []
    for backend in ("int", "emulate"):
        cfg = dataclasses.replace(load_recipe("lenet5-fmnist"), model="mymodels:small",
                                  backend=backend)
        model, opt = build(cfg, (8, 8, 1), K)
        assert sum(m.bias is not None for m in model.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))) == 2
        train_epoch(model, opt, x, y, batch_size=10, seed=0, epoch=0)
        states.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("spec, words", [
    ("mymodels:", ["is not package.module:function"]),
    ("a:b:c", ["is not package.module:function"]),
    ("nosuchmodule:small", ["cannot import nosuchmodule", "current directory"]),
    ("mymodels:nothing", ["mymodels has no nothing"]),
    ("mymodels:NOT_CALLABLE", ["non-callable NOT_CALLABLE"]),
    ("mymodels:broken", ["broken() raised RuntimeError: no weights file"]),
    ("mymodels:not_a_module", ["returned a list, not a torch nn.Module"]),
    ("mymodels:ten_classes", ["gives (2, 10)", "(2, 3) logits"]),
    ("mymodels:gelu", ["GELU"]),
])
def test_bad_models_are_one_line(models, capsys, spec, words):
    data = make_npz(models / "d.npz")
    one_line_exit_2(capsys, words, "--model", spec, "--data", str(data), "--epochs", "1",
                    "--out", str(models / "run"))


def test_norm_none_is_refused_for_your_model(models, capsys):
    data = make_npz(models / "d.npz")
    one_line_exit_2(capsys, ["norm none", "l1", "l2"], "--model", "mymodels:small",
                    "--norm", "none", "--data", str(data), "--out", str(models / "run"))


def test_your_function_is_told_the_data_sizes(models, capsys):
    """Parameters named num_classes / classes, in_channels, height and width get the data's."""
    data = make_npz(models / "d.npz")
    status, _, err = run_cli(capsys, "--model", "mymodels:sized", "--data", str(data),
                             "--epochs", "1", "--batch-size", "10", "--out", str(models / "r"))
    assert status == 0, err
