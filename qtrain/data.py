"""Fashion-MNIST and MNIST from canonical IDX files, and the input format of integer training.

* :func:`read_idx` -- one IDX file, gzipped or not, fully validated.
* :func:`load_mnist_like` -- a split of ``fashion-mnist`` or ``mnist`` as a :class:`Dataset`,
  found by searching :func:`search_dirs` in order.
* :func:`stratified_subset` -- a class-balanced, seeded subset (tests, benchmarks).
* :func:`to_codes` -- pixels to 8-bit signed input codes ``(q, e)``.
* :func:`batches` -- index batches whose order depends only on ``(seed, epoch)``.

Where the data comes from
-------------------------
:func:`search_dirs` asks every entry of :data:`SOURCES` in turn for candidate directories; the
first directory that holds the split's images and labels wins. The built-in order:

1. the ``data_dir`` argument (the ``--data-dir`` option),
2. ``$QTRAIN_DATA``,
3. the system dataset directory (:data:`SYSTEM_DIRS`; for Fashion-MNIST Debian's package
   ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``),
4. the user cache ``$XDG_CACHE_HOME/qtrain/<name>`` (default ``~/.cache/qtrain/<name>``),
   which :func:`download` fills where a network exists,
5. last, for Fashion-MNIST only, the stratified subset embedded in the package
   (``qtrain/datasets/fashion-mnist-subset``: 300 train and 100 test images per class). It is
   consulted only when asked for (``subset=True``, which :func:`load_dataset` passes), so a
   caller of :func:`load_mnist_like` asking for the real data gets an error, not 3000 images.

For 1 and 2 the subdirectory ``<name>/`` is tried before the directory itself, so one data
directory can hold both datasets. A directory may hold each file plain or gzipped
(``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``; plain wins if both exist).
A source is a function ``(name, data_dir) -> list[Candidate]``; sources that provide a subset
rather than the full set are also listed in :data:`SUBSET_SOURCES`.

:func:`load_dataset` is the entry point for the command line: ``(train, test)`` of
``fashion-mnist``, ``mnist`` or ``cifar10`` (:func:`load_cifar10`, from the python batches
directory ``cifar-10-batches-py``), downloading a missing MNIST-like set into the user cache
first and falling back to the embedded subset when that fails.

Every problem with the data raises :class:`DataError`, a :class:`ValueError` whose message is
one line: what is wrong, which file or directory, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import importlib.resources
import math
import os
import pickle
import re
import socket
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TextIO

import numpy as np

from . import spec

__all__ = [
    "CLASSES",
    "Candidate",
    "DATASETS",
    "DOWNLOAD_URLS",
    "DataError",
    "DataNotFound",
    "Dataset",
    "IDX_FILES",
    "INPUT_EXP",
    "MNIST_LIKE",
    "SOURCES",
    "SUBSET_DIR",
    "SUBSET_SOURCES",
    "SYSTEM_DIRS",
    "batches",
    "download",
    "load_cifar10",
    "load_dataset",
    "load_mnist_like",
    "read_idx",
    "search_dirs",
    "stratified_subset",
    "to_codes",
    "user_cache_dir",
    "write_idx",
]


class DataError(ValueError):
    """Missing, incomplete or corrupt data; the message is one line (what, where, how to fix)."""


class DataNotFound(DataError):
    """No place searched holds the data (as opposed to data found but broken)."""


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

#: IDX type code (third magic byte) -> numpy dtype of the big-endian payload.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_REFETCH = "re-download it or point --data-dir elsewhere"


def _fail(path: str | os.PathLike, what: str, fix: str = _REFETCH) -> DataError:
    return DataError(f"{what} in {os.fspath(path)}; {fix}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a native-endian, writable numpy array.

    The file may be gzipped; that is recognized by the gzip magic bytes ``1f 8b``, not by the
    name. The header is ``00 00 <type> <ndim>`` then ``ndim`` big-endian uint32 sizes, then the
    big-endian payload of ``prod(sizes)`` items of the type (:data:`IDX_DTYPES`: 0x08 ubyte,
    0x09 sbyte, 0x0B short, 0x0C int, 0x0D float, 0x0E double).

    Raises:
        DataError: the file is unreadable, not gzip-valid, has a bad magic number, an unknown
            type code, ``ndim`` 0, a short header, or a payload shorter or longer than the
            sizes promise.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise _fail(path, f"cannot read IDX file ({reason})",
                    "check the path or point --data-dir elsewhere") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise _fail(path, f"corrupt or truncated gzip data ({reason})") from None

    if len(raw) < 4:
        raise _fail(path, f"not an IDX file (only {len(raw)} bytes, no 4-byte magic number)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise _fail(path, f"not an IDX file (magic number {raw[:4].hex(' ')}, "
                          "expected 00 00 <type> <ndim>)")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise _fail(path, f"unsupported IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise _fail(path, "IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail(path, f"truncated IDX header ({len(raw)} bytes, {ndim} dimensions "
                          f"need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        shape = "x".join(map(str, dims))
        kind = "truncated IDX payload" if got < expected else "extra bytes after IDX payload"
        raise _fail(path, f"{kind} ({got} bytes, a {shape} {dtype.name} array needs "
                          f"{expected})")
    array = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a copy: native order, writable


def write_idx(path: str | os.PathLike, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` as an IDX file that :func:`read_idx` reads back equal; returns the path.

    The dtype must be one of :data:`IDX_DTYPES` (any byte order) and ``ndim`` 1..255. With
    ``gz=None`` the file is gzipped when its name ends in ``.gz``. Gzip output is deterministic
    (level 9, mtime 0, no file name), so the same array always gives the same bytes. The file is
    written to a temporary file in the same directory and renamed over ``path``.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    code = next((c for c, dt in IDX_DTYPES.items() if dt.newbyteorder("=") == native), None)
    if code is None:
        raise TypeError(f"write_idx: no IDX type for dtype {array.dtype.name}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: ndim must be 1..255, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if gz if gz is not None else path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    _atomic_write(path, [raw])
    return path


def _atomic_write(path: Path, chunks) -> None:
    """Write the byte chunks to ``path`` atomically (:func:`qtrain.files.atomic_write`)."""
    from .files import atomic_write

    def write(f):
        for chunk in chunks:
            f.write(chunk)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# Datasets and where to find them
# --------------------------------------------------------------------------------------------

#: Class names by dataset, in label order.
CLASSES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}

#: Datasets :func:`load_dataset` knows, and those stored as MNIST-like IDX files.
DATASETS: tuple[str, ...] = tuple(spec.DATASETS)
MNIST_LIKE: tuple[str, ...] = ("fashion-mnist", "mnist")

#: System-wide dataset directory per dataset and how to name it to people.
SYSTEM_DIRS: dict[str, tuple[Path, str]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),
                      "Debian package dataset-fashion-mnist"),
    "mnist": (Path("/usr/share/datasets/mnist"), "system dataset directory"),
}

SPLITS = {"train": "train", "test": "t10k"}  # split -> canonical file prefix
IMAGE_SHAPE = (28, 28)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of an MNIST-like dataset, held in memory.

    Attributes:
        images: uint8 array (N, 28, 28), pixel 0 = background.
        labels: uint8 array (N,), values in ``0..len(classes)-1``.
        name: ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"`` (whose images are uint8
            (N, 32, 32, 3), height x width x RGB).
        split: ``"train"`` or ``"test"``.
        source: where it came from, for people, e.g.
            ``"Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"``;
            for the embedded subset it also says how to get the full set.
        classes: class names in label order.
        is_subset: the data is the subset embedded in the package, not the full dataset.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    split: str
    source: str
    classes: tuple[str, ...]
    is_subset: bool = False

    def __len__(self) -> int:
        return len(self.labels)


class Candidate(NamedTuple):
    """A directory that may hold a dataset, and how to name it to people."""

    path: Path
    source: str


Source = Callable[[str, "str | os.PathLike | None"], "list[Candidate]"]


def _with_subdir(path: Path, name: str, label: str) -> list[Candidate]:
    sub = path / name
    return [Candidate(sub, f"{label} ({sub})"), Candidate(path, f"{label} ({path})")]


def _given_dir(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    return [] if data_dir is None else _with_subdir(Path(data_dir), name, "--data-dir")


def _env_dir(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    env = os.environ.get("QTRAIN_DATA")
    return _with_subdir(Path(env), name, "$QTRAIN_DATA") if env else []


def _system_dir(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    path, label = SYSTEM_DIRS[name]
    return [Candidate(path, f"{label} ({path})")]


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/qtrain/<name>`` (``~/.cache/qtrain/<name>`` when unset or relative)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~/.cache"))
    return root / "qtrain" / name


def _user_cache(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    path = user_cache_dir(name)
    return [Candidate(path, f"user cache ({path})")]


#: The stratified Fashion-MNIST subset shipped in the package (made by scripts/make_subset.py).
SUBSET_DIR = "fashion-mnist-subset"
SUBSET_SIZES = {"train": 3000, "test": 1000}
SUBSET_SOURCE = (f"embedded subset ({SUBSET_SIZES['train']} train / {SUBSET_SIZES['test']} "
                 "test images) -- for the full set: apt-get install dataset-fashion-mnist, "
                 "or --data-dir")


def _package_dir(*parts: str) -> Path:
    """A directory of package data as a real path (the package is installed unzipped)."""
    res = importlib.resources.files("qtrain").joinpath("datasets", *parts)
    return Path(os.fspath(res))


def _embedded_subset(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    if name != "fashion-mnist":
        return []
    return [Candidate(_package_dir(SUBSET_DIR), SUBSET_SOURCE)]


#: Candidate directory providers, asked in order by :func:`search_dirs`.
SOURCES: list[Source] = [_given_dir, _env_dir, _system_dir, _user_cache, _embedded_subset]

#: The sources in :data:`SOURCES` that provide a subset; skipped unless ``subset=True``.
SUBSET_SOURCES: set[Source] = {_embedded_subset}


def _check_name(name: str) -> None:
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(MNIST_LIKE)}")


def search_dirs(name: str, data_dir: str | os.PathLike | None = None, *,
                subset: bool = False) -> list[Candidate]:
    """The ordered directories :func:`load_mnist_like` looks in for dataset ``name``.

    Nothing is read or created; a candidate need not exist. See the module docstring for the
    order. ``[c.path for c in search_dirs(...)]`` gives the bare paths. The sources in
    :data:`SUBSET_SOURCES` (the embedded subset) are included, last, only with ``subset=True``.
    """
    _check_name(name)
    return [c for source in SOURCES if subset or source not in SUBSET_SOURCES
            for c in source(name, data_dir)]


def _find(directory: Path, stem: str) -> Path | None:
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _check_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path,
                num_classes: int) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise _fail(image_path, f"images must be an N x 28 x 28 array, got shape "
                                f"{'x'.join(map(str, images.shape))}")
    if images.dtype != np.uint8:
        raise _fail(image_path, f"images must be unsigned bytes (IDX type 0x08), got "
                                f"{images.dtype.name}")
    if labels.ndim != 1:
        raise _fail(label_path, f"labels must be a 1-D array, got shape "
                                f"{'x'.join(map(str, labels.shape))}")
    if labels.dtype != np.uint8:
        raise _fail(label_path, f"labels must be unsigned bytes (IDX type 0x08), got "
                                f"{labels.dtype.name}")
    if len(labels) != len(images):
        raise DataError(f"{label_path} has {len(labels)} labels but {image_path} has "
                        f"{len(images)} images; the files belong to different sets, "
                        "re-download them or point --data-dir elsewhere")
    if len(images) == 0:
        raise _fail(image_path, "no examples (N = 0)")
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise _fail(label_path, f"label {int(labels[i])} at index {i} is outside "
                                f"0..{num_classes - 1} ({bad.size} such labels)")


def load_mnist_like(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                    subset: bool = False) -> Dataset:
    """Load split ``"train"`` or ``"test"`` of ``"fashion-mnist"`` or ``"mnist"``.

    The first candidate of :func:`search_dirs` that holds both ``<prefix>-images-idx3-ubyte``
    and ``<prefix>-labels-idx1-ubyte`` (``prefix`` ``train`` or ``t10k``, each optionally
    ``.gz``) is read and checked: images uint8 (N, 28, 28), labels uint8 (N,) with the same N,
    labels within the classes. With ``subset=True`` the embedded subset is the last candidate
    (the result then has ``is_subset`` set).

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DataError: a directory holds only one file of the pair, a file is corrupt or does not
            match, or no candidate holds the split (the message lists every place searched).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    image_stem = f"{SPLITS[split]}-images-idx3-ubyte"
    label_stem = f"{SPLITS[split]}-labels-idx1-ubyte"
    candidates = search_dirs(name, data_dir, subset=subset)
    for cand in candidates:
        image_path, label_path = _find(cand.path, image_stem), _find(cand.path, label_stem)
        if image_path is None and label_path is None:
            continue
        if image_path is None or label_path is None:
            present, missing = ((image_path, label_stem) if label_path is None
                                else (label_path, image_stem))
            raise _fail(cand.path, f"{present.name} has no partner {missing}[.gz]",
                        "add the missing file or remove the incomplete set")
        images, labels = read_idx(image_path), read_idx(label_path)
        _check_pair(images, labels, image_path, label_path, len(CLASSES[name]))
        return Dataset(images, labels, name, split, cand.source, CLASSES[name],
                       is_subset=cand.source == SUBSET_SOURCE)

    places = "; ".join(c.source for c in candidates)
    how = ("apt-get install dataset-fashion-mnist, or" if name == "fashion-mnist" else
           "download the four canonical IDX files and")
    raise DataNotFound(f"{name} {split} data ({image_stem}[.gz] and {label_stem}[.gz]) not found "
                    f"in: {places}; {how} set --data-dir or $QTRAIN_DATA to a directory holding "
                    "them")


# --------------------------------------------------------------------------------------------
# Download into the user cache
# --------------------------------------------------------------------------------------------

#: The four canonical files of an MNIST-like dataset, in download order.
IDX_FILES: tuple[str, ...] = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

#: Base URL per dataset that :func:`download` appends the file names of :data:`IDX_FILES` to.
DOWNLOAD_URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

_CHUNK = 1 << 16


def _no_network_hint(name: str) -> str:
    extra = " or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
    return f"there is no network here? use --data-dir{extra}"


def _fetch(url: str, dest: Path, timeout: float, name: str, stream: TextIO) -> None:
    """Download ``url`` to ``dest`` atomically, with a progress line on ``stream``."""
    tty = hasattr(stream, "isatty") and stream.isatty()
    label = f"downloading {url}"

    def chunks(response):
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            done += len(chunk)
            if tty:
                of = f" / {total / 1e6:.1f}" if total else ""
                print(f"\r{label}: {done / 1e6:.1f}{of} MB", end="", file=stream, flush=True)
            yield chunk
        print(f"\r{label}: {done / 1e6:.1f} MB, done" if tty else
              f"{label}: {done} bytes, done", file=stream, flush=True)

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            _atomic_write(dest, chunks(response))
    except urllib.error.HTTPError as err:  # the server answered, but not with the file
        if tty:
            print(file=stream)
        raise DataError(f"could not download {url} (HTTP {err.code} {err.reason}); the mirror "
                        f"may have moved; use --data-dir"
                        f"{_no_network_hint(name).split('--data-dir', 1)[1]}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
            ConnectionError, TimeoutError) as err:
        if tty:
            print(file=stream)
        reason = getattr(err, "reason", None) or err
        reason = str(reason).splitlines()[0] if str(reason) else type(err).__name__
        raise DataError(f"could not download {url} ({reason}); "
                        f"{_no_network_hint(name)}") from None
    except OSError as err:  # writing the cache failed
        reason = err.strerror or type(err).__name__
        raise DataError(f"cannot write {dest} ({reason}); make the cache writable or set "
                        "$XDG_CACHE_HOME, or use --data-dir") from None


def download(name: str, cache_dir: str | os.PathLike | None = None,
             base_url: str | None = None, timeout: float = 30,
             stream: TextIO | None = None) -> Path:
    """Download the four canonical IDX files of ``name`` into ``cache_dir``; return that dir.

    ``cache_dir`` defaults to :func:`user_cache_dir` ``(name)``, where the search for data
    looks; ``base_url`` to :data:`DOWNLOAD_URLS` ``[name]`` (the file names of
    :data:`IDX_FILES` are appended to it). Each file is streamed into a temporary file in
    ``cache_dir``, checked with :func:`read_idx` (and each split's images against its labels),
    and only then renamed into place, so an interrupted or bad download never leaves a partial
    or corrupt file under the canonical name. A file already present that reads as valid IDX is
    kept, not fetched again. Progress goes to ``stream`` (default ``sys.stderr``).

    Raises:
        ValueError: unknown ``name`` (only MNIST-like sets download; CIFAR-10 does not).
        DataError: the network fails (one line: the URL, the reason, what to do instead), a
            downloaded file is not valid IDX or the pair does not match (nothing is kept), or
            the cache directory cannot be written.
    """
    _check_name(name)
    stream = sys.stderr if stream is None else stream
    base = DOWNLOAD_URLS[name] if base_url is None else base_url
    base = base if base.endswith("/") else base + "/"
    target = user_cache_dir(name) if cache_dir is None else Path(cache_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the download directory {target} "
                        f"({err.strerror or type(err).__name__}); make it writable or set "
                        "$XDG_CACHE_HOME, or use --data-dir") from None
    try:
        return _download_into(name, target, base, timeout, stream)
    except BaseException:
        try:
            target.rmdir()  # only if the failed attempt left it empty
        except OSError:
            pass
        raise


def _download_into(name: str, target: Path, base: str, timeout: float,
                   stream: TextIO) -> Path:
    arrays = {}
    for fname in IDX_FILES:
        dest = target / fname
        if dest.is_file():
            try:
                arrays[fname] = read_idx(dest)
                continue
            except DataError:
                pass  # a bad earlier copy: fetch it again
        url = base + fname
        tmp = target / f".{fname}.{os.getpid()}.download"
        try:
            _fetch(url, tmp, timeout, name, stream)
            try:
                arrays[fname] = read_idx(tmp)
            except DataError as err:
                detail = str(err).split(f" in {tmp}", 1)[0]
                raise DataError(f"downloaded {url} is not a valid IDX file ({detail}); it was "
                                f"not kept in {target}; try again later or use "
                                "--data-dir") from None
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    for split, prefix in SPLITS.items():
        image_path = target / f"{prefix}-images-idx3-ubyte.gz"
        label_path = target / f"{prefix}-labels-idx1-ubyte.gz"
        try:
            _check_pair(arrays[image_path.name], arrays[label_path.name], image_path,
                        label_path, len(CLASSES[name]))
        except DataError:
            image_path.unlink(missing_ok=True)
            label_path.unlink(missing_ok=True)
            raise
    return target


# --------------------------------------------------------------------------------------------
# CIFAR-10 from the python batches
# --------------------------------------------------------------------------------------------

CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR_HOW = ("download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
              f"and point --data-dir at the extracted {CIFAR10_DIR}")


def _cifar_candidates(data_dir: str | os.PathLike | None) -> list[Candidate]:
    bases = []
    if data_dir is not None:
        bases.append((Path(data_dir), "--data-dir"))
    if os.environ.get("QTRAIN_DATA"):
        bases.append((Path(os.environ["QTRAIN_DATA"]), "$QTRAIN_DATA"))
    out = []
    for base, label in bases:
        for path in (base / CIFAR10_DIR, base / "cifar10" / CIFAR10_DIR, base / "cifar10", base):
            out.append(Candidate(path, f"{label} ({path})"))
    cache = user_cache_dir("cifar10")
    for path in (cache / CIFAR10_DIR, cache):
        out.append(Candidate(path, f"user cache ({path})"))
    return out


def _batch_number(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch -> images uint8 (N, 32, 32, 3), labels uint8 (N,)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except OSError as err:
        raise _fail(path, f"cannot read CIFAR-10 batch ({err.strerror or type(err).__name__})",
                    "check the file or point --data-dir elsewhere") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _fail(path, f"not a CIFAR-10 python batch (cannot unpickle: {reason})",
                    _CIFAR_HOW) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise _fail(path, f"not a CIFAR-10 python batch (need a dict with keys b'data' and "
                          f"b'labels', got {keys})", _CIFAR_HOW)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or data.shape[0] == 0:
        what = (f"a {data.dtype.name} array of shape {'x'.join(map(str, data.shape))}"
                if isinstance(data, np.ndarray) else type(data).__name__)
        raise _fail(path, f"CIFAR-10 b'data' must be a uint8 N x 3072 array (10000 x 3072 in "
                          f"the real batches), got {what}", _CIFAR_HOW)
    try:
        labels = np.asarray(batch[b"labels"])
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise _fail(path, "CIFAR-10 b'labels' must be a list of integers", _CIFAR_HOW)
    if len(labels) != len(data):
        raise _fail(path, f"{len(labels)} labels but {len(data)} images in one CIFAR-10 batch",
                    _CIFAR_HOW)
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        i = int(bad[0])
        raise _fail(path, f"label {int(labels[i])} at index {i} is outside 0..9 ({bad.size} "
                          "such labels)", _CIFAR_HOW)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.uint8)


def load_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of CIFAR-10 from its python batches directory.

    Looked for in ``data_dir``, ``$QTRAIN_DATA`` and the user cache
    ``$XDG_CACHE_HOME/qtrain/cifar10``, each as ``<dir>/cifar-10-batches-py``,
    ``<dir>/cifar10/cifar-10-batches-py``, ``<dir>/cifar10`` and ``<dir>``: the first directory
    holding ``test_batch`` or any ``data_batch_<k>`` wins. Train is every ``data_batch_<k>``
    (normally 1..5, in order of ``k``), test is ``test_batch``. Images are uint8
    (N, 32, 32, 3), height x width x RGB; labels uint8 in 0..9. The batches are pickles: point
    this only at files you trust. There is no download for CIFAR-10.

    Raises:
        DataError: nothing found (the message lists every place searched and how to get it),
            a directory with train batches but no test batch or the other way round, or a
            corrupt batch (the message names the file).
    """
    candidates = _cifar_candidates(data_dir)
    for cand in candidates:
        if not cand.path.is_dir():
            continue
        train_files = sorted((p for p in cand.path.glob("data_batch_*")
                              if re.fullmatch(r"data_batch_\d+", p.name) and p.is_file()),
                             key=_batch_number)
        test_file = cand.path / "test_batch"
        has_test = test_file.is_file()
        if not train_files and not has_test:
            continue
        if not train_files or not has_test:
            missing = "test_batch" if train_files else "data_batch_1..5"
            raise _fail(cand.path, f"incomplete CIFAR-10 batches directory (no {missing})",
                        f"add the missing files or {_CIFAR_HOW}")
        parts = [_read_cifar_batch(p) for p in train_files]
        train_images = np.concatenate([im for im, _ in parts])
        train_labels = np.concatenate([lb for _, lb in parts])
        test_images, test_labels = _read_cifar_batch(test_file)
        classes = CLASSES["cifar10"]
        return (Dataset(train_images, train_labels, "cifar10", "train", cand.source, classes),
                Dataset(test_images, test_labels, "cifar10", "test", cand.source, classes))
    places = "; ".join(str(c.path) for c in candidates)
    raise DataNotFound(f"CIFAR-10 not found in: {places}; qtrain does not download it: "
                       f"{_CIFAR_HOW}")


# --------------------------------------------------------------------------------------------
# Both splits of a dataset: the entry point of the command line
# --------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 download_missing: bool = True,
                 stream: TextIO | None = None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.

    For the MNIST-like sets each split is found by :func:`load_mnist_like` in the order of the
    module docstring. When a split is in none of the full-data places and ``download_missing``
    is true, :func:`download` first fills the user cache; if that fails, Fashion-MNIST falls
    back to the embedded subset (``is_subset`` set, ``source`` saying how to get the full set)
    with a warning line on ``stream`` (default ``sys.stderr``), and MNIST raises. Without
    ``download_missing`` Fashion-MNIST goes straight to the subset. CIFAR-10 comes from
    :func:`load_cifar10` (never downloaded).

    Raises:
        ValueError: unknown ``name``.
        DataError: ``data_dir`` is given but is not a directory; data is corrupt (wherever it
            was found: a broken file is never skipped silently); MNIST or CIFAR-10 is nowhere
            and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {os.fspath(data_dir)} is not a directory; give the "
                        "directory that holds the dataset files")
    if name == "cifar10":
        return load_cifar10(data_dir)
    stream = sys.stderr if stream is None else stream

    def load_full():
        out = {}
        for split in SPLITS:
            try:
                out[split] = load_mnist_like(name, split, data_dir)
            except DataNotFound as err:
                out[split] = err
        return out

    found = load_full()
    missing = [s for s, v in found.items() if isinstance(v, DataError)]
    if not missing:
        return found["train"], found["test"]
    failure = None
    if download_missing:
        try:
            download(name, stream=stream)
        except DataError as err:
            failure = err
        else:
            found = load_full()
            missing = [s for s, v in found.items() if isinstance(v, DataError)]
            if not missing:
                return found["train"], found["test"]
    if name != "fashion-mnist":
        err = found[missing[0]]
        if failure is not None:
            raise DataNotFound(f"{err} (the download failed too: {failure})") from None
        raise err
    if failure is not None:
        print(f"warning: {failure}; using the embedded subset instead", file=stream,
              flush=True)
    for split in missing:
        found[split] = load_mnist_like(name, split, data_dir, subset=True)
    return found["train"], found["test"]


# --------------------------------------------------------------------------------------------
# Subsets, input codes, batches
# --------------------------------------------------------------------------------------------

def stratified_subset(ds: Dataset, per_class: int, seed: int | None = 0) -> Dataset:
    """``per_class`` examples of every class, in a deterministic order.

    With an integer ``seed`` the examples of each class are drawn at random without
    replacement and the result is shuffled, both from ``numpy.random.default_rng(seed)``; with
    ``seed=None`` the first ``per_class`` examples of each class are kept in file order.
    The same ``(ds, per_class, seed)`` always gives the same subset in the same order.

    Raises:
        ValueError: ``per_class < 1``.
        DataError: a class has fewer than ``per_class`` examples.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    rng = None if seed is None else np.random.default_rng(seed)
    chosen = []
    for c, cls in enumerate(ds.classes):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < per_class:
            raise DataError(f"class {c} ({cls}) of {ds.name} {ds.split} has {len(idx)} examples, "
                            f"fewer than per_class={per_class}; ask for at most {len(idx)}")
        chosen.append(idx[:per_class] if rng is None
                      else rng.choice(idx, per_class, replace=False))
    order = np.concatenate(chosen)
    order = np.sort(order) if rng is None else rng.permutation(order)
    how = "first" if seed is None else f"seed {seed}"
    return dataclasses.replace(ds, images=ds.images[order], labels=ds.labels[order],
                               source=f"{ds.source}, {per_class} per class ({how})")


#: Exponent of the input codes: value = code * 2**INPUT_EXP.
INPUT_EXP = -7
_CODE_TABLE = np.clip(np.arange(256) - 128, -127, 127).astype(np.int8)


def to_codes(images: np.ndarray) -> tuple[np.ndarray, int]:
    r"""Pixels to the training input format, 8-bit signed codes.

    .. math:: q = \mathrm{clip}(p - 128, -127, 127), \qquad x = q \cdot 2^{-7}

    so a pixel's value is :math:`(p - 128)/128` in :math:`[-127/128, 127/128]`. The code
    -128 is outside the symmetric 8-bit range, so pixels 0 and 1 both give -127; nothing else
    is lost.

    Args:
        images: uint8 array of any shape.

    Returns:
        ``(codes, exp)``: int8 codes of the same shape and ``exp = INPUT_EXP = -7``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"to_codes expects uint8 pixels, got {images.dtype.name}")
    return _CODE_TABLE[images], INPUT_EXP


def batches(ds_images: np.ndarray, ds_labels: np.ndarray, batch_size: int, seed: int,
            epoch: int, shuffle: bool = True, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering one epoch, e.g. ``x, y = images[i], labels[i]``.

    The epoch's permutation comes from
    ``numpy.random.default_rng(numpy.random.SeedSequence([seed, epoch]))`` and nothing else, so
    a run resumed at epoch ``k`` sees the order it would have seen. Every index appears exactly
    once per epoch; the last batch is shorter unless ``drop_last`` drops it. ``shuffle=False``
    gives ``0..N-1`` in order.

    Raises:
        ValueError: images and labels differ in length, ``batch_size < 1``, or a negative
            ``seed`` or ``epoch``.
    """
    n = len(ds_images)
    if len(ds_labels) != n:
        raise ValueError(f"{n} images but {len(ds_labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    else:
        order = np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
