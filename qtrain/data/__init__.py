"""Fashion-MNIST, MNIST, CIFAR-10 and the user's own data in memory, and the input format of
integer training.

* :func:`load_dataset` (here) -- the command line's entry point: ``(train, test)`` of
  ``fashion-mnist``, ``mnist`` or ``cifar10``, downloading a missing MNIST-like set into the
  user cache first and falling back to the embedded Fashion-MNIST subset when that fails; or
  of the user's ``FILE.npz`` or ``DIR/`` of image folders.
* :mod:`.idx` -- :func:`read_idx` (one IDX file, gzipped or not, fully validated),
  :func:`write_idx`.
* :mod:`.sources` -- where data is searched for (:func:`search_dirs`, :data:`SOURCES`, the
  embedded subset) and :func:`load_mnist_like`, one split of ``fashion-mnist`` or ``mnist`` as a
  :class:`Dataset`.
* :mod:`.download` -- :func:`download` into the user cache.
* :mod:`.cifar` -- :func:`load_cifar10` from the python batches.
* :mod:`.user` -- :func:`load_user_data`, the user's ``.npz`` file or image folders, checked.
* :mod:`.inputs` -- :func:`stratified_subset` (a class-balanced, seeded subset),
  :func:`to_codes` (pixels to 8-bit signed input codes ``(q, e)``) and :func:`batches` (index
  batches whose order depends only on ``(seed, epoch)``).
* :mod:`.errors` -- every problem with the data raises :class:`DataError`, a
  :class:`ValueError` whose message is one line: what is wrong, which file or directory, and
  how to fix it.

Every public name of the submodules is importable from ``qtrain.data``. The package imports
numpy only (no torch, no numba; Pillow when image folders are read).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from .. import spec
from .cifar import CIFAR10_DIR, load_cifar10
from .download import DOWNLOAD_URLS, IDX_FILES, download
from .errors import DataError, DataNotFound
from .idx import IDX_DTYPES, read_idx, write_idx
from .inputs import INPUT_EXP, batches, stratified_subset, to_codes
from .sources import (CLASSES, DATASETS, IMAGE_SHAPE, MNIST_LIKE, SOURCES, SPLITS, SUBSET_DIR,
                      SUBSET_SIZES, SUBSET_SOURCE, SUBSET_SOURCES, SYSTEM_DIRS, Candidate,
                      Dataset, load_mnist_like, search_dirs, user_cache_dir)
from .user import IMAGE_EXTENSIONS, NPZ_ARRAYS, load_user_data

__all__ = [
    "CIFAR10_DIR",
    "CLASSES",
    "Candidate",
    "DATASETS",
    "DOWNLOAD_URLS",
    "DataError",
    "DataNotFound",
    "Dataset",
    "IDX_DTYPES",
    "IDX_FILES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SHAPE",
    "INPUT_EXP",
    "MNIST_LIKE",
    "NPZ_ARRAYS",
    "SOURCES",
    "SPLITS",
    "SUBSET_DIR",
    "SUBSET_SIZES",
    "SUBSET_SOURCE",
    "SUBSET_SOURCES",
    "SYSTEM_DIRS",
    "batches",
    "download",
    "load_cifar10",
    "load_dataset",
    "load_mnist_like",
    "load_user_data",
    "read_idx",
    "search_dirs",
    "stratified_subset",
    "to_codes",
    "user_cache_dir",
    "write_idx",
]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 download_missing: bool = True,
                 stream: TextIO | None = None) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``, or of the user's
    data when ``name`` is a path (:func:`qtrain.spec.data_is_path`: :func:`load_user_data`,
    which ignores the other arguments).

    For the MNIST-like sets each split is found by :func:`load_mnist_like` in the order of
    :mod:`qtrain.data.sources`' docstring. When a split is in none of the full-data places and
    ``download_missing`` is true, :func:`download` first fills the user cache; if that fails,
    Fashion-MNIST falls back to the embedded subset (``is_subset`` set, ``source`` saying how
    to get the full set) with a warning line on ``stream`` (default ``sys.stderr``), and MNIST
    raises. Without ``download_missing`` Fashion-MNIST goes straight to the subset. CIFAR-10 comes from
    :func:`load_cifar10` (never downloaded).

    Raises:
        ValueError: unknown ``name``.
        DataError: ``data_dir`` is given but is not a directory; data is corrupt (wherever it
            was found: a broken file is never skipped silently); MNIST or CIFAR-10 is nowhere
            and cannot be downloaded.
    """
    if spec.data_is_path(name):
        return load_user_data(name)
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
            download(name, stream=stream)  # qtrain.data.download: tests replace it
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
