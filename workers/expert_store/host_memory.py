"""Freed experts go back to the OS: a fixed glibc mmap threshold for the store's process.

The store allocates and frees expert-sized host buffers all the time (reads, conversions, fast-tier
entries evicted in any order). glibc serves them from mmap at first, but after the first such
buffer is freed its dynamic threshold rises to the buffer's size, and from then on experts come
from the heap, where freed ones stay resident as fragments: measured on a random Mixtral with
6 MB experts at a 179 MB budget, anonymous memory grew by 337-499 MB instead of ~240 MB. A fixed
threshold (which also turns the dynamic one off) keeps every buffer of at least MMAP_THRESHOLD
bytes in its own mapping, unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 1 << 20  # expert buffers are MBs; activations of a decode step stay below
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_ENV = "MALLOC_MMAP_THRESHOLD_"  # set by the user: glibc already uses it, leave it alone
_done = False


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold once per process; False where there is no glibc or it is set."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get(_ENV):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = ok
    return ok
