"""splice.malloc: with the mmap threshold pinned, freed buffers go back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# 16 buffers of 8 MiB, each followed by a 1 MiB block that stays allocated (as Python objects
# and small tensors do), after a 24 MiB buffer was freed (which raises glibc's dynamic
# threshold). Prints the MiB still resident after the 8 MiB buffers are freed.
SCRIPT = """
import ctypes, ctypes.util, sys
from splice.malloc import pin_mmap_threshold
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
p = libc.malloc(24 << 20); ctypes.memset(p, 1, 24 << 20); libc.free(p)
r0 = rss()
big, keep = [], []
for _ in range(16):
    b = libc.malloc(8 << 20); ctypes.memset(b, 1, 8 << 20); big.append(b)
    keep.append(libc.malloc(1 << 20))
for b in big:
    libc.free(b)
print(rss() - r0)
"""


def retained_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def test_pinned_threshold_returns_freed_buffers() -> None:
    assert retained_mib("default") > 64  # the fragmentation the pin is for (128 MiB here)
    assert retained_mib("pin") < 8
