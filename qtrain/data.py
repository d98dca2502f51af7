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
4. the user cache ``$XDG_CACHE_HOME/qtrain/<name>`` (default ``~/.cache/qtrain/<name>``).

For 1 and 2 the subdirectory ``<name>/`` is tried before the directory itself, so one data
directory can hold both datasets. A directory may hold each file plain or gzipped
(``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``; plain wins if both exist).
A source is a function ``(name, data_dir) -> list[Candidate]``; later sources (a download into
the user cache, a subset embedded in the package) are appended to :data:`SOURCES`.

Every problem with the data raises :class:`DataError`, a :class:`ValueError` whose message is
one line: what is wrong, which file or directory, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

__all__ = [
    "CLASSES",
    "Candidate",
    "DataError",
    "Dataset",
    "INPUT_EXP",
    "SOURCES",
    "SYSTEM_DIRS",
    "batches",
    "load_mnist_like",
    "read_idx",
    "search_dirs",
    "stratified_subset",
    "to_codes",
]


class DataError(ValueError):
    """Missing, incomplete or corrupt data; the message is one line (what, where, how to fix)."""


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


# --------------------------------------------------------------------------------------------
# Datasets and where to find them
# --------------------------------------------------------------------------------------------

#: Class names by dataset, in label order.
CLASSES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
}

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
        name: ``"fashion-mnist"`` or ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        source: where it came from, for people, e.g.
            ``"Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"``.
        classes: class names in label order.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    split: str
    source: str
    classes: tuple[str, ...]

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


def _user_cache(name: str, data_dir: str | os.PathLike | None) -> list[Candidate]:
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~/.cache"))
    path = root / "qtrain" / name
    return [Candidate(path, f"user cache ({path})")]


#: Candidate directory providers, asked in order by :func:`search_dirs`.
SOURCES: list[Source] = [_given_dir, _env_dir, _system_dir, _user_cache]


def _check_name(name: str) -> None:
    if name not in CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(CLASSES)}")


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Candidate]:
    """The ordered directories :func:`load_mnist_like` looks in for dataset ``name``.

    Nothing is read or created; a candidate need not exist. See the module docstring for the
    order. ``[c.path for c in search_dirs(...)]`` gives the bare paths.
    """
    _check_name(name)
    return [c for source in SOURCES for c in source(name, data_dir)]


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


def load_mnist_like(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load split ``"train"`` or ``"test"`` of ``"fashion-mnist"`` or ``"mnist"``.

    The first candidate of :func:`search_dirs` that holds both ``<prefix>-images-idx3-ubyte``
    and ``<prefix>-labels-idx1-ubyte`` (``prefix`` ``train`` or ``t10k``, each optionally
    ``.gz``) is read and checked: images uint8 (N, 28, 28), labels uint8 (N,) with the same N,
    labels within the classes.

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
    candidates = search_dirs(name, data_dir)
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
        return Dataset(images, labels, name, split, cand.source, CLASSES[name])

    places = "; ".join(c.source for c in candidates)
    how = ("apt-get install dataset-fashion-mnist, or" if name == "fashion-mnist" else
           "download the four canonical IDX files and")
    raise DataError(f"{name} {split} data ({image_stem}[.gz] and {label_stem}[.gz]) not found "
                    f"in: {places}; {how} set --data-dir or $QTRAIN_DATA to a directory holding "
                    "them")


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
