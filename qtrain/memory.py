"""How a qtrain process keeps the memory it frees.

glibc serves blocks of more than a few hundred KiB with ``mmap`` and hands them back to the
system when they are freed, so a training step that allocates multi-MB arrays (im2col columns,
int32 GEMM results, their float32 containers) pays a page fault per 4 KiB of each, every step.
:func:`keep_freed_memory` raises glibc's mmap and trim thresholds so freed blocks stay in the
heap and are reused. The ``qtrain`` program does this at start (the lenet5-paper step at batch
128: about 30 -> 26 ms here); the benchmarks do it for every method alike. A process that
imports qtrain as a library keeps its allocator as it is unless it calls this itself.
"""

from __future__ import annotations

import ctypes

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this come from the heap, and up to this much freed memory stays there.
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD`; False where the C library
    is not glibc (nothing changes then)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
