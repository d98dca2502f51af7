"""CIFAR-10 from its python batches directory (``cifar-10-batches-py``): :func:`load_cifar10`.
It is never downloaded."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np

from .errors import DataNotFound, fail
from .sources import CLASSES, Candidate, Dataset, user_cache_dir

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
        raise fail(path, f"cannot read CIFAR-10 batch ({err.strerror or type(err).__name__})",
                    "check the file or point --data-dir elsewhere") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise fail(path, f"not a CIFAR-10 python batch (cannot unpickle: {reason})",
                    _CIFAR_HOW) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise fail(path, f"not a CIFAR-10 python batch (need a dict with keys b'data' and "
                          f"b'labels', got {keys})", _CIFAR_HOW)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or data.shape[0] == 0:
        what = (f"a {data.dtype.name} array of shape {'x'.join(map(str, data.shape))}"
                if isinstance(data, np.ndarray) else type(data).__name__)
        raise fail(path, f"CIFAR-10 b'data' must be a uint8 N x 3072 array (10000 x 3072 in "
                          f"the real batches), got {what}", _CIFAR_HOW)
    try:
        labels = np.asarray(batch[b"labels"])
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise fail(path, "CIFAR-10 b'labels' must be a list of integers", _CIFAR_HOW)
    if len(labels) != len(data):
        raise fail(path, f"{len(labels)} labels but {len(data)} images in one CIFAR-10 batch",
                    _CIFAR_HOW)
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        i = int(bad[0])
        raise fail(path, f"label {int(labels[i])} at index {i} is outside 0..9 ({bad.size} "
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
            raise fail(cand.path, f"incomplete CIFAR-10 batches directory (no {missing})",
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
