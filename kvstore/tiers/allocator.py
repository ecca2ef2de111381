"""A first-fit allocator over one span [0, size): blocks of any size, holes coalesced."""

from __future__ import annotations

import bisect


class SpanAllocator:
    """Hands out aligned spans of one arena. O(holes) per call, which stays small:
    blocks of one layout all have one size, so holes are reused exactly."""

    def __init__(self, size: int, alignment: int = 64, base: int = 0) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.base = base
        self.size = (size // alignment) * alignment
        self.used = 0
        # holes sorted by offset: parallel lists for bisect
        self._starts: list[int] = [base] if self.size else []
        self._lengths: list[int] = [self.size] if self.size else []

    def rounded(self, nbytes: int) -> int:
        a = self.alignment
        return max(a, (nbytes + a - 1) // a * a)

    def allocate(self, nbytes: int) -> int | None:
        need = self.rounded(nbytes)
        for i, length in enumerate(self._lengths):
            if length >= need:
                start = self._starts[i]
                if length == need:
                    del self._starts[i]
                    del self._lengths[i]
                else:
                    self._starts[i] = start + need
                    self._lengths[i] = length - need
                self.used += need
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        length = self.rounded(nbytes)
        end = offset + length
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < end) or (
            i > 0 and self._starts[i - 1] + self._lengths[i - 1] > offset
        ):
            raise ValueError(f"double free or bad span at offset {offset} (+{length})")
        self.used -= length
        merge_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == offset
        merge_next = i < len(self._starts) and self._starts[i] == end
        if merge_prev and merge_next:
            self._lengths[i - 1] += length + self._lengths[i]
            del self._starts[i]
            del self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += length
        elif merge_next:
            self._starts[i] = offset
            self._lengths[i] += length
        else:
            self._starts.insert(i, offset)
            self._lengths.insert(i, length)

    @property
    def largest_hole(self) -> int:
        return max(self._lengths, default=0)

    @property
    def holes(self) -> int:
        return len(self._starts)
