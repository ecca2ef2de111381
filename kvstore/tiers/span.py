"""Tiers whose slots are spans of one arena, handed out by a :class:`SpanAllocator`."""

from __future__ import annotations

from kvstore.tiers.allocator import SpanAllocator
from kvstore.tiers.base import Slot, Tier


class SpanTier(Tier):
    """The slot bookkeeping of an arena tier (cpu, gpu): ``self._alloc`` set by the
    subclass."""

    _alloc: SpanAllocator

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

    @property
    def largest_hole(self) -> int:
        return self._alloc.largest_hole
