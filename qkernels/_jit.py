"""Compiling one kernel twice: serial for small arrays, parallel for large ones."""

from __future__ import annotations

import types

from numba import njit

#: Arrays smaller than this run on one thread: starting Numba's thread pool costs more than it
#: saves, and its threads would compete with torch's (or another process's) for the cores.
PARALLEL_MIN = 1 << 16


def serial_and_parallel(fn):
    """``(serial, parallel)`` Numba builds of ``fn`` (``prange`` is ``range`` in the first),
    both cached on disk.

    Numba's cache keys an entry by the function's qualified name, source line and signature,
    not by ``parallel``: compiled from the same function object, the two builds would share
    one entry, and the second to compile would load the first's code. The parallel build is
    therefore made from a copy of the function under its own name (``<name>_parallel``).
    """
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_parallel",
                              fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_parallel"
    twin.__doc__ = fn.__doc__
    return njit(cache=True)(fn), njit(cache=True, parallel=True)(twin)


def pick(serial, parallel, n: int):
    """The build of a :func:`serial_and_parallel` pair for ``n`` elements: serial below
    :data:`PARALLEL_MIN`, parallel from there (both give the same results)."""
    return parallel if n >= PARALLEL_MIN else serial
