"""The CPU tier: one host arena, in POSIX shared memory when workers on this host map it."""

from __future__ import annotations

import contextlib
import os
import uuid
from multiprocessing import shared_memory

from kvstore.tiers.allocator import SpanAllocator
from kvstore.tiers.base import Slot
from kvstore.tiers.span import SpanTier
from services.transfer.arena_names import new_arena_name
from services.transfer.bulk import address
from services.transfer.contract.arena import HEADER_BYTES, LANDING_BASE, arena_header


class CpuTier(SpanTier):
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
        if len(header) > LANDING_BASE:
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

    def view(self, slot: Slot) -> memoryview:
        return self._buf[slot.offset : slot.offset + slot.length]

    # -- shared memory ----------------------------------------------------------------
    @property
    def shm_name(self) -> str:
        """The name clients open (no leading slash); empty when the arena is private."""
        return self._shm.name.lstrip("/") if self._shm is not None else ""

    def host_span(self) -> tuple[int, int]:
        """(address, bytes) of the whole arena in this process (to page-lock it)."""
        return address(self._buf), len(self._buf)

    def header(self) -> memoryview:
        """The arena's header (the landing pads are in it)."""
        return self._buf[:HEADER_BYTES]

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
