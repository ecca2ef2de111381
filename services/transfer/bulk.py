"""Bulk copies and crc32s of block payloads off the GIL, over a few threads.

``ctypes.memmove`` and isal's crc32 release the GIL, so a copy of many blocks split over
two threads runs on two cores: on the 2-core development VM crc32-then-copy of 64 MiB
goes from ~5.5 GB/s on one thread to ~8 GB/s on two. Each block is checksummed just
before it is copied, so the copy reads it from cache.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from services.transfer.contract.checksum import crc32

# below this many bytes one thread does it all: a hand-off costs tens of microseconds
PARALLEL_MIN_BYTES = 2 << 20

_memmove = ctypes.memmove


class Copy(NamedTuple):
    """One block: copy ``src`` (a byte view at address ``src_addr``; 0: look it up) to
    ``dst_addr`` (0: no copy, only its crc32)."""

    src: memoryview
    src_addr: int
    dst_addr: int


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address(view: memoryview) -> int:
    """The address of a contiguous byte view's first byte. The caller keeps ``view``
    (and so the memory) alive while the address is used."""
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    pb = _PyBuffer()
    if _get_buffer(view, ctypes.byref(pb), 0) != 0:  # pragma: no cover (raises first)
        raise BufferError("cannot get the address of a buffer")
    try:
        return pb.buf or 0
    finally:
        _release_buffer(ctypes.byref(pb))


def empty(nbytes: int) -> memoryview:
    """A writable, uninitialized buffer of ``nbytes`` starting on a 64-byte boundary.

    memmove between two buffers whose addresses differ by 1 to 31 bytes modulo 4096
    runs ~10x slower here (4K aliasing: 2-3 GB/s instead of ~27 for a cached block).
    Arena slots are 64-byte aligned, so a 64-byte aligned destination never hits it;
    malloc's large buffers are only 16-byte aligned and step through every offset.
    """
    mv = memoryview(np.empty(nbytes + 64, np.uint8))
    skip = -address(mv) % 64
    return mv[skip : skip + nbytes]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    """How many threads a bulk copy uses (the caller's included)."""
    return max(1, min(8, os.cpu_count() or 1))


def crcs(views: Sequence[memoryview]) -> list[int]:
    """The crc32 of every view, over ``threads()`` threads for large batches."""
    return crc_copy([Copy(v, 0, 0) for v in views])


def _helpers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max(1, threads() - 1),
                                           thread_name_prefix="kv-bulk")
    return _pool


_ALIAS_MAX = 32  # destinations 1..31 bytes past the source, modulo a page, are slow
_BOUNCE = 64 << 10
_local = threading.local()


def copy(dst: int, src: int, n: int) -> None:
    """memmove(dst, src, n) off the GIL, around 4K aliasing: when ``dst`` lies 1 to 31
    bytes past ``src`` modulo 4096 (a copy ~10x slower here), the bytes go through a
    small per-thread buffer half a page away from both (cached, so it costs little)."""
    if not 0 < (dst - src) % 4096 < _ALIAS_MAX or n <= 4096:
        _memmove(dst, src, n)
        return
    bounce = getattr(_local, "bounce", None)
    if bounce is None:
        bounce = _local.bounce = np.empty(_BOUNCE + 8192, np.uint8)
    base = bounce.ctypes.data
    mid = base + (src + 2048 - base) % 4096  # src + half a page, modulo a page
    for off in range(0, n, _BOUNCE):
        k = min(_BOUNCE, n - off)
        _memmove(mid, src + off, k)
        _memmove(dst + off, mid, k)


def _run(copies: Sequence[Copy], out: list[int], order: Iterator[int]) -> None:
    """Copies the blocks ``order`` hands out (shared by the threads: each takes the next
    one when it is done with its last, so uneven blocks balance out)."""
    n = len(copies)
    for i in order:
        if i >= n:
            return
        c = copies[i]
        out[i] = crc32(c.src)
        if c.dst_addr:
            copy(c.dst_addr, c.src_addr or address(c.src), c.src.nbytes)


def crc_copy(copies: Sequence[Copy]) -> list[int]:
    """Copies every block and returns the crc32 of each, computed from its source just
    before the copy (which then reads from cache), in order. Large batches run on
    ``threads()`` threads, each taking the next block as it goes."""
    out = [0] * len(copies)
    order = itertools.count()  # next() on it is atomic: the threads share it
    total = sum(c.src.nbytes for c in copies)
    n = min(threads(), len(copies))
    if n < 2 or total < PARALLEL_MIN_BYTES:
        _run(copies, out, order)
        return out
    pool = _helpers()
    futures: list[Future] = [pool.submit(_run, copies, out, order) for _ in range(n - 1)]
    try:
        _run(copies, out, order)
    finally:  # never return while a helper still writes into the caller's memory
        for f in futures:
            f.result()
    return out
