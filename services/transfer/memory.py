"""Process memory settings that make bulk transfers fast.

glibc returns freed large buffers to the kernel (munmap, heap trim), so the next
transfer's buffers are fresh pages that fault in one by one; on a VM a first touch
costs several times a memcpy. Keeping freed memory in the heap for reuse (a fixed
mmap threshold of 32 MiB, the most glibc allows, and a high trim threshold) makes a
get into new buffers run at copy speed. Called by the store at startup and by a
transport when it is opened; a no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_done = False
_lock = threading.Lock()


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Applies the settings once per process -> whether glibc took them."""
    global _done
    with _lock:
        if _done:
            return True
        _done = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        return mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
