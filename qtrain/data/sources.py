"""Where MNIST-like data is searched for, and :func:`load_mnist_like`, which reads one split.

:func:`search_dirs` asks every entry of :data:`SOURCES` in turn for candidate directories; the
first directory that holds the split's images and labels wins. The built-in order:

1. the ``data_dir`` argument (the ``--data-dir`` option),
2. ``$QTRAIN_DATA``,
3. the system dataset directory (:data:`SYSTEM_DIRS`; for Fashion-MNIST Debian's package
   ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``),
4. the user cache ``$XDG_CACHE_HOME/qtrain/<name>`` (default ``~/.cache/qtrain/<name>``),
   which :func:`qtrain.data.download` fills where a network exists,
5. last, for Fashion-MNIST only, the stratified subset embedded in the package
   (``qtrain/datasets/fashion-mnist-subset``: 300 train and 100 test images per class). It is
   consulted only when asked for (``subset=True``, which :func:`qtrain.data.load_dataset`
   passes), so a caller of :func:`load_mnist_like` asking for the real data gets an error, not
   3000 images.

For 1 and 2 the subdirectory ``<name>/`` is tried before the directory itself, so one data
directory can hold both datasets. A directory may hold each file plain or gzipped
(``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``; plain wins if both exist).
A source is a function ``(name, data_dir) -> list[Candidate]``; sources that provide a subset
rather than the full set are also listed in :data:`SUBSET_SOURCES`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .. import spec
from .errors import DataError, DataNotFound, fail
from .idx import read_idx

#: Class names by dataset, in label order.
CLASSES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}

#: Datasets :func:`qtrain.data.load_dataset` knows, and those stored as MNIST-like IDX files.
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
    """One split of a dataset, held in memory.

    Attributes:
        images: uint8 array (N, 28, 28), pixel 0 = background; (N, H, W) grayscale or
            (N, H, W, 3) colour in general.
        labels: uint8 array (N,) (int64 for the user's data), values in ``0..len(classes)-1``.
        name: ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"`` (whose images are uint8
            (N, 32, 32, 3), height x width x RGB), or the path of the user's data.
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


def check_name(name: str) -> None:
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(MNIST_LIKE)}")


def search_dirs(name: str, data_dir: str | os.PathLike | None = None, *,
                subset: bool = False) -> list[Candidate]:
    """The ordered directories :func:`load_mnist_like` looks in for dataset ``name``.

    Nothing is read or created; a candidate need not exist. See the module docstring for the
    order. ``[c.path for c in search_dirs(...)]`` gives the bare paths. The sources in
    :data:`SUBSET_SOURCES` (the embedded subset) are included, last, only with ``subset=True``.
    """
    check_name(name)
    return [c for source in SOURCES if subset or source not in SUBSET_SOURCES
            for c in source(name, data_dir)]


def _find(directory: Path, stem: str) -> Path | None:
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def check_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path,
                num_classes: int) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise fail(image_path, f"images must be an N x 28 x 28 array, got shape "
                                f"{'x'.join(map(str, images.shape))}")
    if images.dtype != np.uint8:
        raise fail(image_path, f"images must be unsigned bytes (IDX type 0x08), got "
                                f"{images.dtype.name}")
    if labels.ndim != 1:
        raise fail(label_path, f"labels must be a 1-D array, got shape "
                                f"{'x'.join(map(str, labels.shape))}")
    if labels.dtype != np.uint8:
        raise fail(label_path, f"labels must be unsigned bytes (IDX type 0x08), got "
                                f"{labels.dtype.name}")
    if len(labels) != len(images):
        raise DataError(f"{label_path} has {len(labels)} labels but {image_path} has "
                        f"{len(images)} images; the files belong to different sets, "
                        "re-download them or point --data-dir elsewhere")
    if len(images) == 0:
        raise fail(image_path, "no examples (N = 0)")
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise fail(label_path, f"label {int(labels[i])} at index {i} is outside "
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
    check_name(name)
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
            raise fail(cand.path, f"{present.name} has no partner {missing}[.gz]",
                        "add the missing file or remove the incomplete set")
        images, labels = read_idx(image_path), read_idx(label_path)
        check_pair(images, labels, image_path, label_path, len(CLASSES[name]))
        return Dataset(images, labels, name, split, cand.source, CLASSES[name],
                       is_subset=cand.source == SUBSET_SOURCE)

    places = "; ".join(c.source for c in candidates)
    how = ("apt-get install dataset-fashion-mnist, or" if name == "fashion-mnist" else
           "download the four canonical IDX files and")
    raise DataNotFound(f"{name} {split} data ({image_stem}[.gz] and {label_stem}[.gz]) not found "
                    f"in: {places}; {how} set --data-dir or $QTRAIN_DATA to a directory holding "
                    "them")
