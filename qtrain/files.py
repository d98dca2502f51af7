"""Files that are never half written: every file qtrain writes goes through :func:`atomic_write`.

The content is written to a temporary file in the destination's directory
(``.<name>.<random>.tmp``), fsynced, and renamed over the destination (``os.replace``); the
directory is fsynced after the rename. A kill at any moment leaves the previous file (or none),
never a partial one; once a call returns, the new file is on disk, so a file written after it
(a run's metrics line after its checkpoint) never reaches the disk before it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

#: Temporary files are ``.<name>.<random>`` + this suffix, beside the destination.
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary binary file next to ``path``, then rename it over
    ``path`` (see the module docstring). The file gets the mode ``open()`` would give it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() gives
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (some platforms): nothing to sync
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, chunks: Iterable[bytes]) -> None:
    """The byte strings of ``chunks`` (a list, or a stream read as it is written), in order,
    into ``path``, atomically."""

    def write(f):
        for chunk in chunks:
            f.write(chunk)

    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) into ``path``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def save_figure(path: Path, fig, dpi: int = 100) -> None:
    """A matplotlib figure as PNG into ``path``, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def remove_partial(directory: Path, names) -> None:
    """Delete the temporary files that killed writes of ``names`` left in ``directory``."""
    for name in names:
        for tmp in Path(directory).glob(f".{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
