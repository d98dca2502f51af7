"""qtrain.data: where data comes from -- the embedded subset, the downloader, CIFAR-10, load_dataset.

The downloader is exercised only against a local HTTP server on 127.0.0.1 (no network is used).
"""

import functools
import gzip
import http.server
import importlib.resources
import importlib.util
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from qtrain import data
from qtrain.data import DataError

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CANONICAL = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def write_set(directory, n=40, split="train", seed=0, labels=None):
    """A small MNIST-like split (gzipped IDX) in ``directory``; labels cycle 0..9 unless given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = data.SPLITS[split]
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8) if labels is None else labels
    data.write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    data.write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def write_both(directory, seed=0):
    return {split: write_set(directory, n=40 if split == "train" else 20, split=split,
                             seed=seed + i) for i, split in enumerate(data.SPLITS)}


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $QTRAIN_DATA, an empty user cache, absent system directories, no proxies."""
    monkeypatch.delenv("QTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for name in data.SYSTEM_DIRS:
        monkeypatch.setitem(data.SYSTEM_DIRS, name, (tmp_path / "system" / name, "system"))
    return tmp_path


def one_line(err, *needles):
    """A DataError message is one line containing every needle."""
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def load_script():
    spec = importlib.util.spec_from_file_location("make_subset", ROOT / "scripts" /
                                                  "make_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# write_idx


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                                   np.array([-5, 0, 2**31 - 1], dtype=np.int32),
                                   np.array([[1.5, -2.0]], dtype=">f8")])
def test_write_idx_round_trip_and_deterministic(tmp_path, array):
    """write_idx -> read_idx gives the array back; gzip output is byte-for-byte repeatable."""
    a = data.write_idx(tmp_path / "a.gz", array)
    b = data.write_idx(tmp_path / "b.gz", array)
    assert a.read_bytes()[:2] == b"\x1f\x8b" and a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(data.read_idx(a), array)
    plain = data.write_idx(tmp_path / "plain", array)
    assert plain.read_bytes()[:2] == b"\x00\x00"
    np.testing.assert_array_equal(data.read_idx(plain), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gz", "b.gz", "plain"]


def test_write_idx_rejects_unknown_dtype(tmp_path):
    with pytest.raises(TypeError, match="IDX"):
        data.write_idx(tmp_path / "x", np.zeros(3, np.uint32))


# --------------------------------------------------------------------------------------------
# The embedded subset


def subset_dir():
    return Path(importlib.resources.files("qtrain") / "datasets" / data.SUBSET_DIR)


def test_subset_shipped_as_package_data():
    """The subset directory holds the four canonical files, LICENSE (MIT, Zalando) and README,
    only plain files (so pyproject's ``datasets/*/*`` ships them all), under 3 MB in all."""
    d = subset_dir()
    names = {p.name for p in d.iterdir()}
    assert set(CANONICAL) | {"LICENSE", "README.md"} <= names
    assert all(p.is_file() for p in d.iterdir())
    assert sum(p.stat().st_size for p in d.iterdir()) < 3_000_000
    licence = (d / "LICENSE").read_text()
    assert "MIT" in licence and "Zalando SE" in licence and "2017" in licence
    readme = (d / "README.md").read_text()
    assert "make_subset.py" in readme and "Fashion-MNIST" in readme
    assert data.search_dirs("fashion-mnist", subset=True)[-1].path == d


def test_subset_found_through_importlib_resources(tmp_path):
    """A copy of the package elsewhere (as a non-editable install would be) finds the subset
    inside itself, not in this checkout."""
    shutil.copytree(ROOT / "qtrain", tmp_path / "qtrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; import qtrain; from qtrain import data; import pathlib; "
            "d = data.search_dirs('fashion-mnist', subset=True)[-1].path; "
            "n = len(data.read_idx(d / 't10k-labels-idx1-ubyte.gz')); "
            "print(pathlib.Path(qtrain.__file__).parent); print(d); print(n)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")}
    env.pop("QTRAIN_DATA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, check=True).stdout.splitlines()
    assert out == [str(tmp_path / "qtrain"),
                   str(tmp_path / "qtrain" / "datasets" / data.SUBSET_DIR), "1000"]


def test_subset_loads_and_is_stratified(no_env):
    """With nothing else present the subset is found: 300 train / 100 test per class, flagged,
    its source names it and how to get the full set."""
    for split, per_class in (("train", 300), ("test", 100)):
        ds = data.load_mnist_like("fashion-mnist", split, subset=True)
        assert ds.is_subset and ds.source == data.SUBSET_SOURCE
        assert len(ds) == data.SUBSET_SIZES[split] == 10 * per_class
        assert ds.images.shape == (10 * per_class, 28, 28) and ds.images.dtype == np.uint8
        assert np.bincount(ds.labels, minlength=10).tolist() == [per_class] * 10
        assert len(np.unique(ds.images.reshape(len(ds), -1), axis=0)) == len(ds)
    assert "apt-get install dataset-fashion-mnist" in data.SUBSET_SOURCE
    assert "--data-dir" in data.SUBSET_SOURCE


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_subset_matches_debian_rows():
    """Every subset image and label is the full file's row named by the indices file, and
    those rows are what scripts/make_subset.py chooses from the full labels (seed 0)."""
    choose = load_script().choose
    d = subset_dir()
    for split, prefix in data.SPLITS.items():
        rows = data.read_idx(d / f"{prefix}-indices-idx1-int.gz")
        assert np.all(np.diff(rows) > 0)
        full_labels = data.read_idx(DEBIAN / f"{prefix}-labels-idx1-ubyte.gz")
        np.testing.assert_array_equal(rows, choose(full_labels, 300 if split == "train" else 100,
                                                   seed=0))
        full_images = data.read_idx(DEBIAN / f"{prefix}-images-idx3-ubyte.gz")
        np.testing.assert_array_equal(data.read_idx(d / f"{prefix}-images-idx3-ubyte.gz"),
                                      full_images[rows])
        np.testing.assert_array_equal(data.read_idx(d / f"{prefix}-labels-idx1-ubyte.gz"),
                                      full_labels[rows])


def test_make_subset_script_is_deterministic(tmp_path):
    """The script on a small full set: stratified, rows in file order, same bytes twice."""
    full = tmp_path / "full"
    labels = np.random.default_rng(3).permutation(np.arange(200) % 10).astype(np.uint8)
    train_images, _ = write_set(full, n=200, labels=labels)
    write_set(full, n=100, split="test", seed=1)
    script = load_script()
    args = ["--data-dir", str(full), "--train-per-class", "5", "--test-per-class", "2"]
    for out in ("a", "b"):
        assert script.main(args + ["--out", str(tmp_path / out)]) == 0
    for name in list(CANONICAL) + ["train-indices-idx1-int.gz", "t10k-indices-idx1-int.gz"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = data.read_idx(tmp_path / "a" / "train-indices-idx1-int.gz")
    ds = data.load_mnist_like("mnist", "train", tmp_path / "a")
    assert np.bincount(ds.labels).tolist() == [5] * 10 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(ds.images, train_images[rows])
    np.testing.assert_array_equal(ds.labels, labels[rows])


def test_subset_is_last_and_only_on_request(no_env, monkeypatch):
    """search_dirs: the subset comes after the cache, only with subset=True, only for
    Fashion-MNIST; any real source wins over it."""
    monkeypatch.setenv("QTRAIN_DATA", str(no_env / "env"))
    plain = data.search_dirs("fashion-mnist", no_env / "arg")
    full = data.search_dirs("fashion-mnist", no_env / "arg", subset=True)
    assert full[:-1] == plain and full[-1].source == data.SUBSET_SOURCE
    assert plain[-1].path == no_env / "cache" / "qtrain" / "fashion-mnist"
    assert data.search_dirs("mnist", subset=True) == data.search_dirs("mnist")
    images, _ = write_set(no_env / "cache" / "qtrain" / "fashion-mnist")
    ds = data.load_mnist_like("fashion-mnist", "train", subset=True)
    assert not ds.is_subset and ds.source.startswith("user cache")
    np.testing.assert_array_equal(ds.images, images)


def test_dataset_is_subset_defaults_false():
    ds = data.Dataset(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8), "mnist",
                      "train", "here", data.CLASSES["mnist"])
    assert ds.is_subset is False


# --------------------------------------------------------------------------------------------
# load_dataset


def forbid_download(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("download must not be called")
    monkeypatch.setattr(data, "download", boom)


def test_load_dataset_full_set_wins(no_env, monkeypatch):
    """A full set in any real place is used as is; no download is attempted."""
    forbid_download(monkeypatch)
    written = write_both(no_env / "arg")
    train, test = data.load_dataset("fashion-mnist", no_env / "arg")
    assert (len(train), len(test)) == (40, 20) and not train.is_subset and not test.is_subset
    np.testing.assert_array_equal(test.images, written["test"][0])
    assert train.source == f"--data-dir ({no_env / 'arg'})"


def test_load_dataset_downloads_into_cache(no_env, monkeypatch):
    """Nothing but the subset found: download() is tried, and the cache it fills is used."""
    calls = []

    def fake_download(name, *args, stream=None, **kwargs):
        calls.append(name)
        write_both(data.user_cache_dir(name), seed=7)
        return data.user_cache_dir(name)

    monkeypatch.setattr(data, "download", fake_download)
    train, test = data.load_dataset("fashion-mnist")
    assert calls == ["fashion-mnist"]
    assert not train.is_subset and train.source.startswith("user cache") and len(test) == 20


def test_load_dataset_falls_back_to_subset(no_env, monkeypatch):
    """A failed download gives the subset for Fashion-MNIST, with one warning line."""
    def failing(name, *args, **kwargs):
        raise DataError("could not download http://x/ (refused); there is no network here?")

    monkeypatch.setattr(data, "download", failing)
    err = io.StringIO()
    train, test = data.load_dataset("fashion-mnist", stream=err)
    assert train.is_subset and test.is_subset and (len(train), len(test)) == (3000, 1000)
    assert train.source == data.SUBSET_SOURCE
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: could not download")
    assert "embedded subset" in lines[0]


def test_load_dataset_without_download(no_env, monkeypatch):
    """download_missing=False goes straight to the subset, silently."""
    forbid_download(monkeypatch)
    err = io.StringIO()
    train, _ = data.load_dataset("fashion-mnist", download_missing=False, stream=err)
    assert train.is_subset and err.getvalue() == ""


def test_load_dataset_mnist_has_no_subset(no_env, monkeypatch):
    """MNIST with nothing found and a failed download: one line with both reasons."""
    monkeypatch.setattr(data, "download", lambda *a, **k: (_ for _ in ()).throw(
        DataError("could not download http://y/ (refused)")))
    with pytest.raises(data.DataNotFound) as err:
        data.load_dataset("mnist")
    one_line(err, "not found in", "could not download http://y/")
    with pytest.raises(data.DataNotFound):
        data.load_dataset("mnist", download_missing=False)


def test_load_dataset_bad_arguments(no_env, monkeypatch):
    """Unknown names are ValueErrors; a --data-dir that is not a directory is a DataError;
    a corrupt file is never skipped in favour of a later source."""
    forbid_download(monkeypatch)
    with pytest.raises(ValueError, match="cifar10"):
        data.load_dataset("imagenet")
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion-mnist", no_env / "nope")
    one_line(err, no_env / "nope", "not a directory")
    write_both(no_env / "arg")
    (no_env / "arg" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03junk")
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion-mnist", no_env / "arg")
    one_line(err, no_env / "arg" / "t10k-images-idx3-ubyte.gz")


# --------------------------------------------------------------------------------------------
# download() against a local HTTP server


class Server:
    """A threaded HTTP server on 127.0.0.1 serving ``root``; records the paths requested."""

    def __init__(self, root):
        self.requests = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = Server(root)
    srv.root = root
    try:
        yield srv
    finally:
        srv.close()


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


def test_download_fills_cache(no_env, server):
    """All four files land in the user cache, equal to what was served, with progress lines;
    a second call fetches nothing; the search then finds them as the user cache."""
    written = write_both(server.root)
    err = io.StringIO()
    target = data.download("fashion-mnist", base_url=server.url, timeout=5, stream=err)
    assert target == no_env / "cache" / "qtrain" / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(CANONICAL)
    assert sorted(server.requests) == sorted(f"/{n}" for n in CANONICAL)
    assert err.getvalue().count("downloading") == 4 and server.url in err.getvalue()
    data.download("fashion-mnist", base_url=server.url, timeout=5, stream=io.StringIO())
    assert len(server.requests) == 4
    ds = data.load_mnist_like("fashion-mnist", "test")
    assert ds.source == f"user cache ({target})"
    np.testing.assert_array_equal(ds.images, written["test"][0])


def test_download_rejects_corrupt_file(no_env, server, tmp_path):
    """A served file that is not valid IDX is rejected: one line naming the URL, nothing kept
    under its name, no temporary file left."""
    write_both(server.root)
    bad = server.root / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))  # truncated header
    cache = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        data.download("mnist", cache, base_url=server.url, timeout=5, stream=io.StringIO())
    one_line(err, server.url + bad.name, "not a valid IDX file")
    assert not (cache / bad.name).exists() and leftovers(cache) == []
    # Not gzip at all, though named .gz: also rejected.
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match="gzip"):
        data.download("mnist", cache, base_url=server.url, timeout=5, stream=io.StringIO())
    assert not (cache / bad.name).exists() and leftovers(cache) == []


def test_download_rejects_mismatched_pair(no_env, server, tmp_path):
    """Valid files whose image and label counts differ are removed, with a DataError."""
    write_both(server.root)
    write_set(server.root, n=21, split="test")  # 21 test images ...
    data.write_idx(server.root / "t10k-labels-idx1-ubyte.gz", np.zeros(20, np.uint8))  # ... 20
    cache = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        data.download("mnist", cache, base_url=server.url, timeout=5, stream=io.StringIO())
    one_line(err, "20 labels", "21 images")
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert (cache / "train-images-idx3-ubyte.gz").exists() and leftovers(cache) == []


def test_download_http_error(no_env, server, tmp_path):
    """A 404 is a one-line DataError naming the URL and the status."""
    cache = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        data.download("fashion-mnist", cache, base_url=server.url, timeout=5,
                      stream=io.StringIO())
    one_line(err, server.url + CANONICAL[0], "404", "--data-dir", "dataset-fashion-mnist")
    assert not cache.exists()  # the failed attempt removed the empty directory it made


def test_download_connection_refused(no_env, tmp_path):
    """Nothing listening: a one-line DataError saying there may be no network, what to do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        data.download("fashion-mnist", cache, base_url=f"http://127.0.0.1:{port}", timeout=5,
                      stream=io.StringIO())
    one_line(err, f"could not download http://127.0.0.1:{port}/{CANONICAL[0]}",
             "no network here?", "--data-dir", "apt-get install dataset-fashion-mnist")
    assert not cache.exists()  # the failed attempt removed the empty directory it made


def test_download_default_urls():
    assert data.DOWNLOAD_URLS["fashion-mnist"] == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    assert data.DOWNLOAD_URLS["mnist"].startswith("https://")
    with pytest.raises(ValueError):
        data.download("cifar10")


# --------------------------------------------------------------------------------------------
# CIFAR-10


def write_batch(path, images_chw, labels, **extra):
    batch = {b"data": images_chw.reshape(len(images_chw), 3072), b"labels": list(labels),
             b"batch_label": b"synthetic", **extra}
    path.write_bytes(pickle.dumps(batch))


def write_cifar(directory, batch_sizes=(20, 20), n_test=10, seed=0):
    """A synthetic cifar-10-batches-py; returns the expected (train, test) images (N,32,32,3)
    and labels, built independently from the CHW pixel layout of the real batches."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    parts = []
    for k, n in enumerate(batch_sizes, start=1):
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_batch(directory / f"data_batch_{k}", chw, labels)
        parts.append((chw, labels))
    hwc = lambda chw: np.stack([chw[:, c] for c in range(3)], axis=-1)  # noqa: E731
    out["train"] = (np.concatenate([hwc(c) for c, _ in parts]),
                    np.concatenate([lb for _, lb in parts]))
    chw = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n_test)
    write_batch(directory / "test_batch", chw, labels)
    out["test"] = (hwc(chw), labels)
    return out


def test_cifar10_loads(no_env):
    """Any number of data_batch_k in numeric order, HWC uint8 images, uint8 labels."""
    expected = write_cifar(no_env / "d" / "cifar-10-batches-py")
    for ds, split in zip(data.load_dataset("cifar10", no_env / "d"), ("train", "test")):
        images, labels = expected[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(labels), 32, 32, 3)
        assert ds.images.flags.c_contiguous and ds.labels.dtype == np.uint8
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.name == "cifar10" and ds.split == split and len(ds.classes) == 10
        assert ds.source == f"--data-dir ({no_env / 'd' / 'cifar-10-batches-py'})"
    assert len(expected["train"][1]) == 40


def test_cifar10_numeric_batch_order_and_env(no_env, monkeypatch):
    """data_batch_10 comes after data_batch_2; $QTRAIN_DATA pointing at the directory works."""
    d = no_env / "env" / "batches"
    expected = write_cifar(d, batch_sizes=(3, 4))
    (d / "data_batch_2").rename(d / "data_batch_10")
    monkeypatch.setenv("QTRAIN_DATA", str(d))
    train, _ = data.load_cifar10()
    np.testing.assert_array_equal(train.images, expected["train"][0])
    assert train.source == f"$QTRAIN_DATA ({d})"


def test_cifar10_not_found(no_env):
    """Nowhere: one line listing the places, saying there is no download and what to do."""
    with pytest.raises(data.DataNotFound) as err:
        data.load_cifar10(no_env / "d")
    one_line(err, no_env / "d", no_env / "cache" / "qtrain" / "cifar10",
             "cifar-10-python.tar.gz", "--data-dir", "cifar-10-batches-py")


def chw(n):
    return np.zeros((n, 3, 32, 32), np.uint8)


@pytest.mark.parametrize("corrupt, words", [
    (lambda p: p.write_bytes(b"not a pickle at all"), "cannot unpickle"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": chw(20).reshape(20, -1)})), "b'labels'"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "b'data'"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((20, 3071), np.uint8),
                                           b"labels": [0] * 20})), "20x3071"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((20, 3072), np.float32),
                                           b"labels": [0] * 20})), "float32"),
    (lambda p: write_batch(p, chw(20), [0] * 19 + [10]), "label 10 at index 19"),
    (lambda p: write_batch(p, chw(20), [0] * 19), "19 labels but 20 images"),
    (lambda p: write_batch(p, chw(20), ["a"] * 20), "list of integers"),
], ids=["not-pickle", "no-labels", "not-dict", "shape", "dtype", "label-range", "count",
        "label-type"])
def test_cifar10_corrupt_batch(no_env, corrupt, words):
    """A corrupt batch is a one-line DataError naming the file and what is wrong."""
    d = no_env / "cifar-10-batches-py"
    write_cifar(d)
    corrupt(d / "data_batch_2")
    with pytest.raises(DataError) as err:
        data.load_cifar10(no_env)
    one_line(err, d / "data_batch_2", words)


def test_cifar10_incomplete(no_env):
    """Train batches without test_batch (or the reverse) name the directory and what's missing."""
    d = no_env / "cifar-10-batches-py"
    write_cifar(d)
    (d / "test_batch").unlink()
    with pytest.raises(DataError) as err:
        data.load_cifar10(no_env)
    one_line(err, d, "no test_batch")
    for p in d.glob("data_batch_*"):
        p.unlink()
    write_batch(d / "test_batch", chw(2), [1, 2])
    with pytest.raises(DataError) as err:
        data.load_cifar10(no_env)
    one_line(err, d, "no data_batch_1..5")
