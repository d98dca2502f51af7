"""The user's own data (--data FILE.npz or DIR/ of image folders, docs/your-data.md): read,
checked, trained on through the command line; every bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtrain.cli import main
from qtrain.config import UserError, apply_sets, load_recipe
from qtrain.data import DataError, load_dataset, load_user_data

ROOT = Path(__file__).resolve().parents[2]
K = 3  # not 10: the class count comes from the data


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")


def _images(n: int, shape=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % K


def make_npz(path: Path, shape=(8, 8), n_train=30, n_test=9, **override) -> Path:
    """An .npz of ``n_train`` / ``n_test`` images of ``shape`` in K classes; ``override``
    replaces (or, given None, drops) arrays."""
    (x_train, y_train), (x_test, y_test) = _images(n_train, shape), _images(n_test, shape, 1)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def make_folders(root: Path, shape=(8, 8, 3), n_train=30, n_test=9,
                 classes=("cat", "dog", "emu")) -> Path:
    """DIR/train/<class>/*.png and DIR/test/<class>/*.png."""
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(n, shape, seed=len(split))
        for i, (image, c) in enumerate(zip(x, y)):
            folder = root / split / classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        status = main(list(args))
    except SystemExit as stop:  # argparse's errors
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_exit_2(capsys, words: list[str], *args) -> str:
    status, _, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- training end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("layout, colour", [("npz", False), ("npz", True), ("folders", True),
                                             ("folders", False)])
def test_trains_one_epoch_on_user_data(tmp_path, capsys, layout, colour):
    """mlp trains for an epoch on K=3 classes of 8x8 images (grayscale or RGB, npz or image
    folders): exit 0, the network has 3 outputs, config.json records the absolute path and
    repeats the run bit for bit."""
    import torch

    shape = (8, 8, 3) if colour else (8, 8)
    data = (make_npz(tmp_path / "d.npz", shape) if layout == "npz"
            else make_folders(tmp_path / "d", shape))
    arg = os.path.relpath(data, Path.cwd()) + ("" if layout == "npz" else "/")
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "--model", "mlp", "--data", arg, "--epochs", "1",
                               "--batch-size", "10", "--out", str(run))
    assert status == 0, err
    assert out.splitlines()[0].startswith("data: ") and str(data) in out.splitlines()[0]
    assert "30 train / 9 test images" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["data"] == str(data)
    assert json.loads((run / "config.json").read_text())["data"] == str(data)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    head = [v for k, v in ckpt["model"].items() if k.endswith("weight") and v.ndim == 2][-1]
    assert head.shape == (K, 256) and ckpt["step"] == 3
    first = [v for k, v in ckpt["model"].items() if k.endswith("weight") and v.ndim == 2][0]
    assert first.shape[1] == 8 * 8 * (3 if colour else 1)

    again = tmp_path / "again"
    status, _, err = run_cli(capsys, "--recipe", str(run / "config.json"), "--out", str(again))
    assert status == 0, err
    ckpt2 = torch.load(again / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, ckpt2["model"][k]) for k, v in ckpt["model"].items())


def test_the_docs_example_runs(tmp_path):
    """docs/your-data.md's complete example, run as written, trains on both layouts."""
    text = (ROOT / "docs" / "your-data.md").read_text()
    section = text[text.index("## A complete example"):]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert [line.split()[:3] for line in out.stdout.splitlines() if " exit " in line] == [
        ["shapes.npz", "exit", "0"], ["shapes/", "exit", "0"]]
    for run in ("shapes-npz", "shapes"):
        assert json.loads((tmp_path / "runs" / run / "summary.json").read_text())[
            "epochs_done"] == 1


# --- what is read ------------------------------------------------------------------------------

def test_npz_layouts(tmp_path):
    """(N, H, W, 1) is read as (N, H, W); labels of any integer type; classes 0..K-1."""
    x, y = _images(12, (5, 6, 1))
    path = make_npz(tmp_path / "d.npz", x_train=x, y_train=y.astype(np.uint8), x_test=x[:4],
                    y_test=y[:4].astype(np.int32))
    train, test = load_dataset(str(path))
    assert train.images.shape == (12, 5, 6) and test.images.shape == (4, 5, 6)
    assert train.classes == ("0", "1", "2") and train.labels.dtype == np.int64
    assert np.array_equal(train.images, x[..., 0]) and np.array_equal(test.labels, y[:4])


def test_folders_classes_sorted_and_mixed_modes(tmp_path):
    """Class index = sorted folder name; one colour image makes every image RGB; other files
    and hidden files are skipped; images below a class folder's subfolders count."""
    root = make_folders(tmp_path / "d", (4, 4), n_train=6, n_test=3, classes=("b", "a", "c"))
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"junk")
    sub = root / "train" / "c" / "more"
    sub.mkdir()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(sub / "x.PNG")
    train, test = load_user_data(root)
    assert train.classes == ("a", "b", "c")
    assert train.images.shape == (7, 4, 4, 3) and test.images.shape == (3, 4, 4, 3)
    assert sorted(np.bincount(train.labels).tolist()) == [2, 2, 3]
    assert np.array_equal(train.images[..., 0], train.images[..., 2])  # gray ones repeated
    gray = make_folders(tmp_path / "g", (4, 4), n_train=6, n_test=3)
    assert load_user_data(gray)[0].images.shape == (6, 4, 4)


def test_paths_in_recipes_and_sets(tmp_path, monkeypatch):
    """--set data=... and a recipe's data take the path forms, recorded absolute; a bare
    unknown word stays an error."""
    monkeypatch.chdir(tmp_path)
    base = load_recipe("mlp-fmnist")
    assert apply_sets(base, ["data=d.npz"]).data == str(tmp_path / "d.npz")
    assert apply_sets(base, ["data=./imgs/"]).data == str(tmp_path / "imgs")
    assert apply_sets(base, ["data=mnist"]).data == "mnist"
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "qtrain" / "recipes" / "mlp-fmnist.toml").read_text().replace(
        'data = "fashion-mnist"', 'data = "sub/imgs"'))
    assert load_recipe(recipe).data == str(tmp_path / "sub" / "imgs")
    with pytest.raises(UserError, match="unknown data 'imagenet'.*FILE.npz"):
        apply_sets(base, ["data=imagenet"])


# --- bad input: one line, exit 2 ---------------------------------------------------------------

def _npz_case(tmp_path, case):
    x, y = _images(30)
    cases = {
        "float images": dict(x_train=x.astype(np.float32) / 255),
        "int images": dict(x_train=x.astype(np.int16)),
        "2-D images": dict(x_train=x.reshape(30, 64)),
        "channels first": dict(x_train=np.repeat(x[:, None], 3, 1)),
        "5 channels": dict(x_train=np.repeat(x[..., None], 5, 3)),
        "no images": dict(x_train=x[:0], y_train=y[:0]),
        "count mismatch": dict(y_train=y[:29]),
        "float labels": dict(y_train=y.astype(np.float64)),
        "one-hot labels": dict(y_train=np.eye(K, dtype=np.int64)[y]),
        "negative label": dict(y_train=np.where(np.arange(30) == 4, -1, y)),
        "class without images": dict(y_train=np.where(y == 1, 2, y)),
        "test label outside": dict(y_test=np.arange(9) % 4),
        "one class": dict(y_train=np.zeros(30, np.int64), y_test=np.zeros(9, np.int64)),
        "shapes differ": dict(x_test=_images(9, (9, 9))[0]),
        "missing array": dict(y_test=None),
    }
    return make_npz(tmp_path / "d.npz", **cases[case])


@pytest.mark.parametrize("case, words", [
    ("float images", ["x_train is float32", "uint8", "* 255).round().astype(np.uint8)"]),
    ("int images", ["x_train is int16", "np.clip(x_train, 0, 255)"]),
    ("2-D images", ["x_train has shape 30x64", "N x H x W"]),
    ("channels first", ["x_train has shape 30x3x8x8", "transpose(0, 2, 3, 1)"]),
    ("5 channels", ["x_train has shape 30x8x8x5", "C = 1 or 3"]),
    ("no images", ["x_train holds no images"]),
    ("count mismatch", ["y_train has 29 labels but x_train has 30 images"]),
    ("float labels", ["y_train is float64", "integers", "astype(np.int64)"]),
    ("one-hot labels", ["y_train has shape 30x3", "argmax(1)"]),
    ("negative label", ["y_train has label -1 at index 4"]),
    ("class without images", ["class 1 has no images in y_train"]),
    ("test label outside", ["y_test has label 3 at index 3, outside the 3 classes 0..2"]),
    ("one class", ["only one class"]),
    ("shapes differ", ["x_train holds 8x8 images but x_test 9x9"]),
    ("missing array", ["no array y_test", "it holds x_train, y_train, x_test"]),
])
def test_bad_npz_is_one_line(tmp_path, capsys, case, words):
    path = _npz_case(tmp_path, case)
    line = one_line_exit_2(capsys, words, "--model", "mlp", "--data", str(path),
                           "--out", str(tmp_path / "run"))
    assert str(path) in line
    assert not (tmp_path / "run").exists()


def _folder_case(tmp_path, case) -> Path:
    root = make_folders(tmp_path / "d", (8, 8), n_train=6, n_test=3)
    cat = root / "train" / "cat"
    if case == "no test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in (root / "test").iterdir():
            d.rmdir()
        (root / "test").rmdir()
    elif case == "no class folders":
        root = tmp_path / "e"
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    elif case == "classes differ":
        (root / "test" / "emu").rename(root / "test" / "yak")
    elif case == "empty class":
        for f in (root / "test" / "dog").iterdir():
            f.unlink()
    elif case == "unreadable":
        (cat / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "16-bit":
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(cat / "deep.png")
    elif case == "sizes differ":
        Image.fromarray(np.zeros((9, 8), np.uint8)).save(cat / "zz-big.png")
    elif case == "split sizes differ":
        for f in (root / "test").rglob("*.png"):
            Image.fromarray(np.zeros((6, 6), np.uint8)).save(f)
    elif case == "a file":
        root = tmp_path / "plain"
        root.write_text("x")
    elif case == "missing":
        root = tmp_path / "absent"
    return root


@pytest.mark.parametrize("case, words", [
    ("missing", ["data directory", "absent not found"]),
    ("a file", ["is not a directory of image folders nor an .npz file"]),
    ("no test", ["no test/ folder", "DIR/train/<class>/<images>"]),
    ("no class folders", ["no class folders in", "e/train"]),
    ("classes differ", ["train/ and test/ hold different class folders", "only in train/: emu",
                        "only in test/: yak"]),
    ("empty class", ["no image files (.png .jpg", "in ", "test/dog; add images"]),
    ("unreadable", ["cannot read the image (not a format Pillow knows", "cat/bad.png",
                    "replace or remove the file"]),
    ("16-bit", ["is not 8-bit grayscale or colour", "cat/deep.png"]),
    ("sizes differ", ["image is 9x8 (height x width) but", "cat/000.png is 8x8",
                      "cat/zz-big.png", "resize"]),
    ("split sizes differ", ["train images are 8x8 (height x width) but test images 6x6"]),
])
def test_bad_image_folders_are_one_line(tmp_path, capsys, case, words):
    root = _folder_case(tmp_path, case)
    one_line_exit_2(capsys, words, "--model", "mlp", "--data", f"{root}/",
                    "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, words", [
    (None, ["data file", "d.npz not found"]),
    (b"not a zip file", ["not a readable .npz file"]),
    ("npy", ["one bare array (an .npy file)"]),
    ("object", ["cannot read its arrays"]),
])
def test_bad_npz_files_are_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "d.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content == "object":
        x, y = _images(30)
        np.savez(path, x_train=np.array([x, "a"], dtype=object), y_train=y, x_test=x, y_test=y)
    elif content is not None:
        path.write_bytes(content)
    one_line_exit_2(capsys, words, "--model", "mlp", "--data", str(path),
                    "--out", str(tmp_path / "run"))


@pytest.mark.parametrize("model", ["lenet5", "lenet5-paper", "vgg7"])
def test_model_that_does_not_take_the_shape_is_one_line(tmp_path, capsys, model):
    """A model with fixed inputs on 8x8 user data stops at load time, naming the models that
    fit."""
    path = make_npz(tmp_path / "d.npz")
    one_line_exit_2(capsys, [f"model {model} does not take {path}'s 8x8x1 images",
                             "use model mlp or resnet20"],
                    "--model", model, "--data", str(path), "--out", str(tmp_path / "run"))


@pytest.mark.parametrize("args, words", [
    (("--data", "imagenet"), ["argument --data: invalid choice: 'imagenet'", "FILE.npz"]),
    (("--set", "data=imagenet"), ["unknown data 'imagenet'", "fashion-mnist, mnist, cifar10"]),
])
def test_a_bare_unknown_word_is_not_a_path(tmp_path, capsys, args, words):
    one_line_exit_2(capsys, words, *args, "--out", str(tmp_path / "run"))


def test_loader_errors_are_data_errors(tmp_path):
    """load_user_data raises DataError (a ValueError) with one line."""
    with pytest.raises(DataError, match="not found"):
        load_user_data(tmp_path / "nothing.npz")


def test_a_sweep_leaves_the_check_of_path_data_to_its_runs():
    """cannot_run checks built-in datasets' shapes; the user's data is checked when loaded."""
    import dataclasses

    from qtrain.config import load_recipe
    from qtrain.sweep.grid import cannot_run

    cfg = dataclasses.replace(load_recipe("mlp-fmnist"), data="./mine.npz")
    assert cannot_run(cfg) is None
