"""The CPU tier: one host arena, in POSIX shared memory when workers on this host map it."""

from __future__ import annotations

import contextlib
import os
import uuid
from multiprocessing import shared_memory

from kvstore.tiers.allocator import SpanAllocator
from kvstore.tiers.base import Slot, Tier
from services.transfer.arena_names import new_arena_name
from services.transfer.contract.arena import HEADER_BYTES, arena_header


class CpuTier(Tier):
    """``capacity_bytes`` of host memory for blocks, plus one header page.

    With ``shm=True`` the arena is a ``multiprocessing.shared_memory.SharedMemory``
    segment named :attr:`shm_name` (``/dev/shm/<name>`` on Linux) that same-host
    clients map to read and write blocks directly; ``close`` unlinks it.
    """

    name = "cpu"

    def __init__(self, capacity_bytes: int, *, shm: bool = False, store_id: str = "",
                 alignment: int = 64) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"cpu tier capacity must be > 0 bytes, got {capacity_bytes}")
        self.store_id = store_id or uuid.uuid4().hex
        total = HEADER_BYTES + capacity_bytes
        self._shm: shared_memory.SharedMemory | None = None
        if shm:
            _check_shm_room(total)
            # created owner-only (0600): only this user's processes may map the arena
            self._shm = shared_memory.SharedMemory(name=new_arena_name(), create=True,
                                                   size=total)
            self._buf = self._shm.buf
        else:
            self._buf = memoryview(bytearray(total))
        header = arena_header(self.store_id)
        if len(header) > HEADER_BYTES:
            raise ValueError("store id too long for the arena header")
        self._prefault()
        self._buf[: len(header)] = header
        self._alloc = SpanAllocator(capacity_bytes, alignment=alignment, base=HEADER_BYTES)

    def _prefault(self, step: int = 64 << 20) -> None:
        """Touches every page now: first touch is slow (a VM may fault memory in from its
        host at a fraction of memcpy speed) and belongs to startup, not to a put."""
        zeros = bytes(min(step, len(self._buf)))
        for off in range(0, len(self._buf), step):
            n = min(step, len(self._buf) - off)
            self._buf[off : off + n] = zeros[:n] if n < len(zeros) else zeros

    # -- Tier -------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._alloc.size

    @property
    def used_bytes(self) -> int:
        return self._alloc.used

    def footprint(self, nbytes: int) -> int:
        return self._alloc.rounded(nbytes)

    def allocate(self, nbytes: int) -> Slot | None:
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        offset = self._alloc.allocate(nbytes)
        return None if offset is None else Slot(offset, nbytes)

    def allocate_run(self, nbytes: int, count: int) -> list[Slot] | None:
        if nbytes <= 0 or count <= 0:
            raise ValueError(f"cannot allocate {count} x {nbytes} bytes")
        stride = self._alloc.rounded(nbytes)
        offset = self._alloc.allocate(stride * count)
        if offset is None:
            return None
        return [Slot(offset + i * stride, nbytes) for i in range(count)]

    def free(self, slot: Slot) -> None:
        self._alloc.free(slot.offset, slot.length)

    def free_many(self, slots: list[Slot]) -> None:
        """Neighbouring slots (blocks put together lie back to back) go in one call."""
        rounded = self._alloc.rounded
        start = end = -1
        for s in sorted(slots, key=lambda s: s.offset):
            if s.offset != end:
                if end > start:
                    self._alloc.free(start, end - start)
                start = end = s.offset
            end += rounded(s.length)
        if end > start:
            self._alloc.free(start, end - start)

    def view(self, slot: Slot) -> memoryview:
        return self._buf[slot.offset : slot.offset + slot.length]

    @property
    def largest_hole(self) -> int:
        return self._alloc.largest_hole

    # -- shared memory ----------------------------------------------------------------
    @property
    def shm_name(self) -> str:
        """The name clients open (no leading slash); empty when the arena is private."""
        return self._shm.name.lstrip("/") if self._shm is not None else ""

    @property
    def arena_bytes(self) -> int:
        """Size of the whole mapping (header page included)."""
        return len(self._buf)

    def close(self) -> None:
        shm, self._shm = self._shm, None
        if shm is None:
            return
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
        # views still alive somewhere keep the mapping; it goes with the process
        with contextlib.suppress(BufferError):
            shm.close()


def _check_shm_room(nbytes: int) -> None:
    """Refuses an arena /dev/shm cannot hold: writing past its end would be SIGBUS."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    avail = st.f_bavail * st.f_frsize
    if avail < nbytes:
        raise MemoryError(
            f"/dev/shm has {avail} bytes free, the KV arena needs {nbytes}: "
            "lower kvstore.cpu_bytes, enlarge /dev/shm (docker: --shm-size) or set "
            "kvstore.shm: false"
        )
