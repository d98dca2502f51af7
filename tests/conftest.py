"""Shared fixtures: the Fashion-MNIST that the accuracy tests train on.

Accuracy tests (marked ``accuracy``) take the ``fmnist`` fixture. It finds the data through
qtrain's own search (:func:`qtrain.data.load_dataset` without download: ``$QTRAIN_DATA``, Debian's
``dataset-fashion-mnist``, the user cache, and last the subset shipped in the package), so the
tests run on the full set where it is installed and on the shipped subset (300 train / 100 test
images per class) everywhere else; each test states its thresholds for both. Which source was
used is printed at the end of the run ("accuracy tests ran on ...").

``$QTRAIN_TEST_DATA`` chooses (unset or ``auto``: as above):

* ``subset`` -- hide every full-data source (the system directory, ``$QTRAIN_DATA``, the user
  cache) during the search, as on a machine without the package: the tests run on the subset;
* ``full`` -- fail unless the full set is found (CI sets this where it installed the package).

An accuracy test never skips: a skip is turned into a failure, and no data at all is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

DATA_ENV = "QTRAIN_TEST_DATA"
DATA_CHOICES = ("auto", "subset", "full")
_SOURCE = pytest.StashKey[str]()


class AccuracyData(NamedTuple):
    """Both splits of Fashion-MNIST and which kind they are ("full" or "subset")."""

    train: object  # qtrain.data.Dataset
    test: object
    kind: str
    source: str


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "accuracy: trains on Fashion-MNIST and checks accuracy (never skipped; "
                   f"${DATA_ENV}=auto|subset|full picks the data)")


def _load(choice: str, tmp: os.PathLike) -> AccuracyData:
    from qtrain import data

    with pytest.MonkeyPatch.context() as mp:
        if choice == "subset":
            mp.delenv("QTRAIN_DATA", raising=False)
            mp.setenv("XDG_CACHE_HOME", os.fspath(tmp))  # an empty user cache
            for name, (_, label) in list(data.SYSTEM_DIRS.items()):
                mp.setitem(data.SYSTEM_DIRS, name,
                           (Path(tmp) / "no-system-data" / name, label))
        try:
            train, test = data.load_dataset("fashion-mnist", download_missing=False)
        except data.DataError as err:
            pytest.fail(f"no Fashion-MNIST for the accuracy tests, not even the subset shipped "
                        f"in the package: {err}", pytrace=False)
    if train.is_subset != test.is_subset:
        pytest.fail(f"accuracy tests: train data from {train.source} but test data from "
                    f"{test.source}; install both splits in one place", pytrace=False)
    kind = "subset" if train.is_subset else "full"
    if choice == "full" and kind != "full":
        pytest.fail(f"${DATA_ENV}=full but the full Fashion-MNIST is not found (got "
                    f"{train.source}); apt-get install dataset-fashion-mnist or set $QTRAIN_DATA",
                    pytrace=False)
    if choice == "subset":
        assert kind == "subset", train.source
    sizes = {"full": (60000, 10000), "subset": (3000, 1000)}[kind]
    if (len(train), len(test)) != sizes:
        pytest.fail(f"accuracy tests: {train.source} holds {len(train)} / {len(test)} images, "
                    f"not the {sizes[0]} / {sizes[1]} of the Fashion-MNIST {kind} the thresholds "
                    "are stated for", pytrace=False)
    return AccuracyData(train, test, kind, train.source)


@pytest.fixture(scope="session")
def fmnist(request, tmp_path_factory) -> AccuracyData:
    """Fashion-MNIST for the accuracy tests: the full set where found, else the shipped subset."""
    choice = os.environ.get(DATA_ENV, "auto") or "auto"
    if choice not in DATA_CHOICES:
        pytest.fail(f"${DATA_ENV}={choice!r}; choose one of {', '.join(DATA_CHOICES)}",
                    pytrace=False)
    found = _load(choice, tmp_path_factory.mktemp("no-data"))
    request.config.stash[_SOURCE] = f"{found.kind}: {found.source}"
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("accuracy") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"accuracy test skipped ({reason}); accuracy tests must run"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    source = config.stash.get(_SOURCE, None)
    if source is not None:
        terminalreporter.write_line(f"accuracy tests ran on Fashion-MNIST {source}")


# --- small, learnable MNIST-shaped data for end-to-end runs -------------------------------------


def write_fake_mnist(directory, per_class_train: int, per_class_test: int):
    """IDX files of an easy 10-class problem (a bright band whose position is the class) in
    ``directory``, named like Fashion-MNIST's; returns the directory."""
    from pathlib import Path

    import numpy as np

    from qtrain.data import write_idx

    directory = Path(directory)
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.arange(10 * n) % 10)
        images = rng.integers(0, 60, (10 * n, 28, 28))
        for c in range(10):
            images[labels == c, 2 * c:2 * c + 6, 4:24] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return directory


@pytest.fixture(scope="session")
def fake_mnist():
    """:func:`write_fake_mnist`, for tests and fixtures of any scope."""
    return write_fake_mnist
