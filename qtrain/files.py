"""Files that are never half written: every file qtrain writes goes through :func:`atomic_write`.

The content is written to a temporary file in the destination's directory
(``.<name>.<random>.tmp``), fsynced, and renamed over the destination (``os.replace``); the
directory is fsynced after the rename. A kill at any moment leaves the previous file (or none),
never a partial one; once a call returns, the new file is on disk, so a file written after it
(a run's metrics line after its checkpoint) never reaches the disk before it.

One process writes a directory at a time: :func:`lock_run_dir` holds an advisory lock
(``flock``) on the directory's :data:`LOCK` file for as long as its ``with`` block runs, and a
second writer stops with a one-line :class:`qtrain.config.UserError` naming the holder's pid.
The operating system drops the lock when its process dies, so a crash never leaves a stale
lock behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .config import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

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


# --------------------------------------------------------------------------------------------
# One writer per directory
# --------------------------------------------------------------------------------------------

#: The lock file of a directory being written (it holds the writer's pid and host; removed
#: when the writer ends normally, left behind, unlocked and harmless, by a killed one).
LOCK = ".qtrain.lock"


def _busy(directory: Path, fd: int) -> UserError:
    """The error for ``directory`` locked by another process, naming it from the lock file."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        pid, host = "", ""
    who = f"pid {pid}" if pid.isdigit() else "pid unknown"
    if host and host != socket.gethostname():
        who += f" on {host}"
    return UserError(f"{directory} is being written by another qtrain process ({who}); wait for "
                     "it to end or choose another --out")


def _acquire(directory: Path) -> int | None:
    """An open descriptor of ``directory``'s lock file, locked by this process."""
    path = Path(directory) / LOCK
    for _ in range(5):  # a holder that ends unlinks the file: lock the one the path names
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot write the run directory {directory} "
                            f"({err.strerror or err}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            error = _busy(Path(directory), fd)
            os.close(fd)
            raise error from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise UserError(f"{directory} is being written by other qtrain processes (its lock file "
                    "keeps changing); wait for them to end or choose another --out")


def check_unlocked(directory: Path) -> None:
    """Raise :func:`lock_run_dir`'s one-line error if a process holds ``directory``'s lock."""
    if fcntl is None:  # pragma: no cover
        return
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: nobody writes it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _busy(Path(directory), fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_run_dir(directory: Path) -> Iterator[Path]:
    """Hold the write lock of the existing ``directory`` for the ``with`` block (yields the
    directory); a one-line :class:`~qtrain.config.UserError` if another process holds it.

    The lock is ``flock`` on :data:`LOCK` (non-blocking, per open file: a second holder in the
    same process conflicts too). It is released when the block ends, however it ends, and by
    the operating system when the process dies. A process that does not write the directory
    (a non-zero rank of a distributed run) simply does not take it.
    """
    if fcntl is None:  # pragma: no cover
        yield Path(directory)
        return
    fd = _acquire(directory)
    try:
        yield Path(directory)
    finally:
        try:  # unlink while still locked: a newcomer then locks a new file, never this one
            os.unlink(Path(directory) / LOCK)
        except OSError:
            pass
        os.close(fd)
