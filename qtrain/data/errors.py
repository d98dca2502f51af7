"""The one exception type of :mod:`qtrain.data`: every problem with the data is a
:class:`DataError` whose message is one line (what is wrong, which file, how to fix it)."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Missing, incomplete or corrupt data; the message is one line (what, where, how to fix)."""


class DataNotFound(DataError):
    """No place searched holds the data (as opposed to data found but broken)."""


REFETCH = "re-download it or point --data-dir elsewhere"


def fail(path: str | os.PathLike, what: str, fix: str = REFETCH) -> DataError:
    """``DataError("<what> in <path>; <fix>")``, for the caller to raise."""
    return DataError(f"{what} in {os.fspath(path)}; {fix}")
