"""qtrain.data: IDX reading and validation, the search for data, subsets, input codes, batches."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from qtrain import data
from qtrain.data import DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
         np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def idx_bytes(array, code=None):
    """The canonical IDX encoding of ``array``: 00 00 type ndim, big-endian sizes and items."""
    array = np.asarray(array)
    code = CODES[array.dtype.newbyteorder("=")] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, payload, gz=False):
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_set(directory, n=40, split="train", gz=True, seed=0, labels=None):
    """A small MNIST-like split in ``directory``; labels cycle 0..9 unless given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = data.SPLITS[split]
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8) if labels is None else labels
    suffix = ".gz" if gz else ""
    write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)
    return images, labels


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $QTRAIN_DATA, an empty user cache and an absent system directory."""
    monkeypatch.delenv("QTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in data.SYSTEM_DIRS:
        monkeypatch.setitem(data.SYSTEM_DIRS, name, (tmp_path / "system" / name, "system"))
    return tmp_path


def one_line_naming(err, path):
    """A DataError message is one line that names the file or directory."""
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-128, -1, 0, 127], dtype=np.int8),
    np.array([[-32768, 1], [2, 32767]], dtype=np.int16),
    np.array([-2**31, 7, 2**31 - 1], dtype=np.int32),
    np.array([[0.5, -1.25, np.inf]], dtype=np.float32),
    np.array([np.pi, -0.0, 1e300], dtype=np.float64),
    np.zeros((0, 28, 28), dtype=np.uint8),
], ids=["u1-3d", "i1", "i2", "i4", "f4", "f8", "empty"])
def test_read_idx_round_trip(tmp_path, array, gz):
    """Every IDX type reads back equal, same shape, native byte order, writable, gz or not."""
    path = write(tmp_path / "file.idx", idx_bytes(array), gz)
    got = data.read_idx(path)
    assert got.shape == array.shape and got.dtype == array.dtype
    assert got.dtype.isnative and got.flags.writeable
    np.testing.assert_array_equal(got, array)


def test_gzip_detected_by_content_not_name(tmp_path):
    """A gzipped file without .gz and a plain file named .gz both read."""
    array = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write(tmp_path / "a", idx_bytes(array), True)),
                                  array)
    np.testing.assert_array_equal(data.read_idx(write(tmp_path / "b.gz", idx_bytes(array))),
                                  array)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("payload,words", [
    (b"\x08\x03" + GOOD[2:], "not an IDX file"),
    (b"\x00\x01" + GOOD[2:], "not an IDX file"),
    (b"\x00", "not an IDX file"),
    (b"", "not an IDX file"),
    (GOOD[:2] + b"\x0a" + GOOD[3:], "unsupported IDX type code 0x0A"),
    (GOOD[:3] + b"\x00", "0 dimensions"),
    (GOOD[:10], "truncated IDX header"),
    (GOOD[:-1], "truncated IDX payload"),
    (GOOD[:16], "truncated IDX payload"),
    (GOOD + b"\x00", "extra bytes after IDX payload"),
    (idx_bytes(np.zeros(3, np.int16))[:-1], "truncated IDX payload"),
], ids=["magic-swapped", "magic-nonzero", "1-byte", "empty", "dtype", "ndim0", "header",
        "payload-1", "no-payload", "extra", "short-odd"])
def test_read_idx_corruption(tmp_path, payload, words, gz):
    """Each corruption is a DataError: one line naming the file, the fault and a fix."""
    path = write(tmp_path / "bad-idx3-ubyte", payload, gz)
    with pytest.raises(DataError) as err:
        data.read_idx(path)
    message = one_line_naming(err, path)
    assert words in message and "re-download" in message


def test_read_idx_bad_gzip_and_missing_file(tmp_path):
    """Truncated or corrupt gzip streams and unreadable paths are DataErrors too."""
    packed = gzip.compress(GOOD)
    for i, payload in enumerate([packed[:len(packed) // 2], packed[:-4] + b"\xff\xff\xff\xff",
                                 b"\x1f\x8b garbage"]):
        path = write(tmp_path / f"bad{i}.gz", payload)
        with pytest.raises(DataError) as err:
            data.read_idx(path)
        assert "gzip" in one_line_naming(err, path)
    for path in [tmp_path / "missing", tmp_path]:
        with pytest.raises(DataError) as err:
            data.read_idx(path)
        assert "cannot read" in one_line_naming(err, path)


def test_data_error_is_value_error():
    """The CLI's ValueError handler turns DataError into one line and a non-zero exit."""
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------
# load_mnist_like: validation of the pair


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_load_small_set(no_env, gz):
    """A directory with the canonical files loads both splits, as written."""
    d = no_env / "d"
    images, labels = write_set(d, n=30, gz=gz)
    timages, tlabels = write_set(d, n=20, split="test", gz=gz, seed=1)
    train = data.load_mnist_like("mnist", "train", d)
    test = data.load_mnist_like("mnist", "test", d)
    np.testing.assert_array_equal(train.images, images)
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_array_equal(test.images, timages)
    np.testing.assert_array_equal(test.labels, tlabels)
    assert (train.name, train.split, len(train), len(test)) == ("mnist", "train", 30, 20)
    assert train.classes == tuple("0123456789")
    assert train.source == f"--data-dir ({d})"


def test_plain_file_preferred_over_gzip(no_env):
    """When both name and name.gz exist, the plain file is read."""
    d = no_env / "d"
    write_set(d, gz=True, seed=1)
    images, _ = write_set(d, gz=False, seed=2)
    np.testing.assert_array_equal(data.load_mnist_like("mnist", "train", d).images, images)


def test_images_wrong_ndim(no_env):
    """Images must be N x 28 x 28: a 2-D file is a DataError naming it."""
    d = no_env / "d"
    write_set(d, gz=False)
    path = write(d / "train-images-idx3-ubyte", idx_bytes(np.zeros((40, 784), np.uint8)))
    with pytest.raises(DataError) as err:
        data.load_mnist_like("mnist", "train", d)
    assert "28 x 28" in one_line_naming(err, path)


def test_images_wrong_size_and_dtype(no_env):
    """32 x 32 images and int16 images are refused with the file named."""
    d = no_env / "d"
    write_set(d, gz=False)
    path = d / "train-images-idx3-ubyte"
    for bad in [np.zeros((40, 32, 32), np.uint8), np.zeros((40, 28, 28), np.int16)]:
        write(path, idx_bytes(bad))
        with pytest.raises(DataError) as err:
            data.load_mnist_like("mnist", "train", d)
        one_line_naming(err, path)


def test_labels_wrong_ndim_and_dtype(no_env):
    """Labels must be a 1-D ubyte array."""
    d = no_env / "d"
    write_set(d, gz=False)
    path = d / "train-labels-idx1-ubyte"
    for bad in [np.zeros((40, 1), np.uint8), np.zeros(40, np.int8)]:
        write(path, idx_bytes(bad))
        with pytest.raises(DataError) as err:
            data.load_mnist_like("mnist", "train", d)
        one_line_naming(err, path)


def test_count_mismatch(no_env):
    """Images and labels with different N: a DataError naming both files."""
    d = no_env / "d"
    write_set(d, gz=False)
    labels = write(d / "train-labels-idx1-ubyte", idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(DataError) as err:
        data.load_mnist_like("mnist", "train", d)
    message = one_line_naming(err, labels)
    assert str(d / "train-images-idx3-ubyte") in message and "39 labels" in message


def test_label_out_of_range(no_env):
    """Label 10 is a DataError naming the labels file and the bad value."""
    d = no_env / "d"
    labels = (np.arange(40) % 10).astype(np.uint8)
    labels[17] = 10
    write_set(d, labels=labels)
    with pytest.raises(DataError) as err:
        data.load_mnist_like("fashion-mnist", "train", d)
    message = one_line_naming(err, d / "train-labels-idx1-ubyte.gz")
    assert "label 10 at index 17" in message


def test_corrupt_file_in_set_names_it(no_env):
    """A truncated labels file in an otherwise good directory names that file."""
    d = no_env / "d"
    write_set(d, gz=False)
    path = d / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError) as err:
        data.load_mnist_like("mnist", "train", d)
    assert "truncated" in one_line_naming(err, path)


def test_half_a_pair(no_env):
    """Images without labels is an error naming the directory and the missing file."""
    d = no_env / "d"
    write_set(d)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        data.load_mnist_like("mnist", "train", d)
    assert "train-labels-idx1-ubyte" in one_line_naming(err, d)


def test_bad_arguments(no_env):
    """Unknown dataset names and splits are ValueErrors that list the choices."""
    with pytest.raises(ValueError, match="fashion-mnist"):
        data.load_mnist_like("cifar", "train")
    with pytest.raises(ValueError, match="train"):
        data.load_mnist_like("mnist", "validation")


# --------------------------------------------------------------------------------------------
# load_mnist_like: where the data is found


def test_search_order(no_env, monkeypatch):
    """data_dir (its <name>/ first), then $QTRAIN_DATA (same), then system dir, then cache."""
    monkeypatch.setenv("QTRAIN_DATA", str(no_env / "env"))
    paths = [c.path for c in data.search_dirs("fashion-mnist", no_env / "arg")]
    assert paths == [no_env / "arg" / "fashion-mnist", no_env / "arg",
                     no_env / "env" / "fashion-mnist", no_env / "env",
                     no_env / "system" / "fashion-mnist",
                     no_env / "cache" / "qtrain" / "fashion-mnist"]
    monkeypatch.delenv("QTRAIN_DATA")
    assert [c.path for c in data.search_dirs("mnist")] == [
        no_env / "system" / "mnist", no_env / "cache" / "qtrain" / "mnist"]


def test_real_search_dirs(monkeypatch, tmp_path):
    """The built-in system path is Debian's; the cache defaults to ~/.cache/qtrain/<name>."""
    monkeypatch.delenv("QTRAIN_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cands = data.search_dirs("fashion-mnist")
    assert cands[0] == (DEBIAN, f"Debian package dataset-fashion-mnist ({DEBIAN})")
    assert cands[1].path == tmp_path / ".cache" / "qtrain" / "fashion-mnist"
    assert cands[1].source.startswith("user cache")


def test_data_dir_beats_env_beats_system_beats_cache(no_env, monkeypatch):
    """The first place holding the split wins; the Dataset says which one it was."""
    places = {"arg": no_env / "arg", "env": no_env / "env",
              "system": no_env / "system" / "fashion-mnist",
              "cache": no_env / "cache" / "qtrain" / "fashion-mnist"}
    written = {key: write_set(path, seed=i)[0] for i, (key, path) in enumerate(places.items())}
    monkeypatch.setenv("QTRAIN_DATA", str(places["env"]))

    def loaded(data_dir=None):
        ds = data.load_mnist_like("fashion-mnist", "train", data_dir)
        return next(k for k, im in written.items() if np.array_equal(im, ds.images)), ds.source

    assert loaded(places["arg"]) == ("arg", f"--data-dir ({places['arg']})")
    assert loaded() == ("env", f"$QTRAIN_DATA ({places['env']})")
    assert loaded(no_env / "empty") == ("env", f"$QTRAIN_DATA ({places['env']})")
    monkeypatch.delenv("QTRAIN_DATA")
    assert loaded() == ("system", f"system ({places['system']})")
    for path in places["system"].iterdir():
        path.unlink()
    assert loaded() == ("cache", f"user cache ({places['cache']})")


def test_name_subdirectory(no_env, monkeypatch):
    """A data directory may hold fashion-mnist/ and mnist/ side by side."""
    root = no_env / "root"
    fashion, _ = write_set(root / "fashion-mnist", seed=1)
    digits, _ = write_set(root / "mnist", seed=2)
    np.testing.assert_array_equal(data.load_mnist_like("fashion-mnist", "train", root).images,
                                  fashion)
    monkeypatch.setenv("QTRAIN_DATA", str(root))
    ds = data.load_mnist_like("mnist", "train")
    np.testing.assert_array_equal(ds.images, digits)
    assert ds.source == f"$QTRAIN_DATA ({root / 'mnist'})"


def test_nothing_found(no_env, monkeypatch):
    """No data anywhere: one line listing every place searched and how to get the data."""
    monkeypatch.setenv("QTRAIN_DATA", str(no_env / "env"))
    with pytest.raises(DataError) as err:
        data.load_mnist_like("fashion-mnist", "test", no_env / "arg")
    message = str(err.value)
    assert "\n" not in message
    for cand in data.search_dirs("fashion-mnist", no_env / "arg"):
        assert str(cand.path) in message
    assert "t10k-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


# --------------------------------------------------------------------------------------------
# The real Fashion-MNIST from Debian's dataset-fashion-mnist


@pytest.fixture(scope="module")
def fashion():
    """Both splits from the Debian package, read once for the module."""
    if not all((DEBIAN / f"{p}-{k}.gz").is_file() for p in ("train", "t10k")
               for k in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        pytest.skip(f"{DEBIAN} absent (apt-get install dataset-fashion-mnist)")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("QTRAIN_DATA", raising=False)
        return {split: data.load_mnist_like("fashion-mnist", split) for split in ("train", "test")}


def test_debian_fashion_mnist(fashion):
    """60000 train and 10000 test images, 28 x 28 uint8, every class exactly balanced."""
    train, test = fashion["train"], fashion["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.uint8
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert train.source == f"Debian package dataset-fashion-mnist ({DEBIAN})"
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.images.min() == 0 and train.images.max() == 255
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the canonical first labels


def test_stratified_subset_of_fashion_mnist(fashion):
    """A seeded subset is balanced, deterministic, drawn from the set and shuffled."""
    train = fashion["train"]
    a = data.stratified_subset(train, 50, seed=3)
    b = data.stratified_subset(train, 50, seed=3)
    c = data.stratified_subset(train, 50, seed=4)
    assert len(a) == 500 and np.bincount(a.labels).tolist() == [50] * 10
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert a.name == train.name and a.classes == train.classes
    assert a.source.startswith(train.source)


# --------------------------------------------------------------------------------------------
# stratified_subset, to_codes, batches on small data


def small_ds(n=200, seed=0):
    """Labels at random; every pixel of image i is i (n <= 256), so a subset shows its picks."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
    return data.Dataset(images, labels, "mnist", "train", "test", data.CLASSES["mnist"])


def test_stratified_subset_seeded():
    """Each class contributes per_class of its own examples, no repeats, same for a seed."""
    ds = small_ds()
    sub = data.stratified_subset(ds, 5, seed=7)
    picked = sub.images[:, 0, 0]  # the original index of each example
    assert len(set(picked.tolist())) == 50
    np.testing.assert_array_equal(ds.labels[picked], sub.labels)
    assert np.bincount(sub.labels, minlength=10).tolist() == [5] * 10
    assert not np.all(np.diff(sub.labels.astype(int)) >= 0)  # classes are interleaved
    again = data.stratified_subset(ds, 5, seed=7)
    np.testing.assert_array_equal(again.images, sub.images)


def test_stratified_subset_first_come():
    """seed=None keeps the first per_class of each class, in file order."""
    ds = small_ds()
    sub = data.stratified_subset(ds, 3, seed=None)
    expected = np.sort(np.concatenate([np.flatnonzero(ds.labels == c)[:3] for c in range(10)]))
    np.testing.assert_array_equal(sub.images[:, 0, 0], expected)


def test_stratified_subset_too_few():
    """Asking for more examples than a class has is a DataError naming the class."""
    ds = small_ds(n=30)
    smallest = int(np.bincount(ds.labels, minlength=10).min())
    with pytest.raises(DataError, match="fewer than per_class"):
        data.stratified_subset(ds, smallest + 1, seed=0)
    with pytest.raises(ValueError):
        data.stratified_subset(ds, 0, seed=0)


def test_to_codes():
    """Codes are clip(p - 128, -127, 127) as int8 with exponent -7: value (p - 128)/128."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    codes, exp = data.to_codes(pixels)
    assert exp == -7 == data.INPUT_EXP
    assert codes.dtype == np.int8 and codes.shape == pixels.shape
    assert codes.min() == -127 and codes.max() == 127
    expected = np.clip(pixels.astype(int) - 128, -127, 127)
    np.testing.assert_array_equal(codes, expected)
    values = codes.astype(np.float64) * 2.0 ** exp
    np.testing.assert_array_equal(values.ravel()[1:], (np.arange(1, 256) - 128) / 128)
    strided, _ = data.to_codes(pixels[:, ::2])  # a view; the pixels stay as they were
    np.testing.assert_array_equal(strided, expected[:, ::2])
    np.testing.assert_array_equal(pixels.ravel(), np.arange(256))
    with pytest.raises(TypeError):
        data.to_codes(pixels.astype(np.int16))


def test_batches_cover_each_index_once():
    """One epoch yields every index exactly once, in batches of batch_size and a remainder."""
    images, labels = np.zeros((103, 28, 28), np.uint8), np.zeros(103, np.uint8)
    got = list(data.batches(images, labels, 10, seed=1, epoch=0))
    assert [len(b) for b in got] == [10] * 10 + [3]
    assert sorted(np.concatenate(got).tolist()) == list(range(103))
    dropped = list(data.batches(images, labels, 10, seed=1, epoch=0, drop_last=True))
    assert [len(b) for b in dropped] == [10] * 10
    np.testing.assert_array_equal(np.concatenate(dropped), np.concatenate(got)[:100])
    plain = np.concatenate(list(data.batches(images, labels, 7, 1, 0, shuffle=False)))
    np.testing.assert_array_equal(plain, np.arange(103))


def test_batches_deterministic_per_seed_and_epoch():
    """The order depends on (seed, epoch) only: equal when repeated, different otherwise."""
    images, labels = np.zeros((500, 1), np.uint8), np.zeros(500, np.uint8)

    def order(seed, epoch):
        return np.concatenate(list(data.batches(images, labels, 64, seed, epoch)))

    np.testing.assert_array_equal(order(5, 3), order(5, 3))
    assert not np.array_equal(order(5, 3), order(5, 4))
    assert not np.array_equal(order(5, 3), order(6, 3))
    reference = np.random.default_rng(np.random.SeedSequence([5, 3])).permutation(500)
    np.testing.assert_array_equal(order(5, 3), reference)  # resumable: no hidden state


def test_batches_bad_arguments():
    """Mismatched lengths, batch_size < 1 and negative seeds are ValueErrors."""
    images = np.zeros((4, 28, 28), np.uint8)
    for args in [(np.zeros(3, np.uint8), 2, 0, 0), (np.zeros(4, np.uint8), 0, 0, 0),
                 (np.zeros(4, np.uint8), 2, -1, 0)]:
        with pytest.raises(ValueError):
            next(data.batches(images, *args))


def test_numpy_only_at_import():
    """Importing qtrain.data pulls in neither torch nor numba."""
    import subprocess
    import sys

    code = ("import sys, qtrain.data; "
            "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
