"""Keep freed tensor memory from lingering in the process heap (glibc only).

Streaming work allocates and frees buffers of many sizes, one tensor after another. glibc
serves allocations above its *mmap threshold* with their own mappings, returned to the OS on
free, and the rest from heap arenas that rarely shrink. By default the threshold rises to the
size of the largest mapping freed so far (up to 32 MiB), so after the first big tensor is freed,
buffers of a few MiB (Gram matrices, eigensolver workspaces, float64 blocks) come from the heap,
fragment it, and peak RSS drifts upwards from run to run (measured on one layer of a 1.6 GB
Llama, all metrics: 875-1124 MB over three identical runs of `compare_models`, 828-864 MB with
the threshold pinned at 4 MiB; the whole model: 1548 -> 918 MB).

:func:`pin_mmap_threshold` pins the threshold, which also turns off the dynamic rise.
``splice analyze`` calls it (many temporaries of varied sizes); merge and convert do not: their
buffers repeat in size, so the heap reuses them, and mapping each one afresh costs page faults
(the merge benchmark went from about 0.3x to 0.5-0.65x mergekit's time with it). A notebook may
call it too. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` in glibc's malloc.h
M_MMAP_THRESHOLD = -3

#: allocations above this many bytes get their own mapping, returned to the OS when freed
DEFAULT_THRESHOLD = 4 * 2**20


def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at ``nbytes``; True if it was set (glibc), else False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
