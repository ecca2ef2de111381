"""The tier interface: a fixed-capacity space that hands out contiguous slots."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from services.transfer.contract.checksum import crc32
from services.transfer.contract.device_checksum import KIND_CRC32


class Slot(NamedTuple):
    """One contiguous span of a tier: where one block lives."""

    offset: int
    length: int


class BlockMeta(NamedTuple):
    """What a persistent tier stores with a block's bytes to find it again."""

    key: bytes
    checksum: int
    num_tokens: int = 0
    partial: bool = False


class Found(NamedTuple):
    """A block a persistent tier found at start-up."""

    slot: Slot
    meta: BlockMeta


class Tier(ABC):
    """A place blocks live. Not thread-safe: the store calls it under its own lock,
    except ``view``, whose memory a caller may read or write outside the lock as long as
    the slot stays allocated (the store guarantees that with pins and pending puts)."""

    name: str
    kind: str = ""
    # Memory tiers hand out ``view``s that callers read and write in place; the others
    # (disk) move bytes with ``read_into``/``write``, never under the store's lock.
    has_view = True
    # A tier in GPU memory: cuda_ipc clients read and write it in place; its blocks carry
    # device checksums (dsum32), host tiers' carry crc32 (``checksum_kind``).
    on_device = False
    checksum_kind = KIND_CRC32

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @abstractmethod
    def allocate(self, nbytes: int) -> Slot | None:
        """A slot of ``nbytes`` contiguous bytes, or None when no hole is big enough."""

    def allocate_run(self, nbytes: int, count: int) -> list[Slot] | None:
        """``count`` slots of ``nbytes`` back to back (each freed on its own later), or
        None. Faster than ``count`` allocations; the default makes none."""
        return None

    @abstractmethod
    def free(self, slot: Slot) -> None: ...

    def free_many(self, slots: list[Slot]) -> None:
        """Frees several slots (an eviction's victims); a tier may merge neighbours."""
        for slot in slots:
            self.free(slot)

    @abstractmethod
    def view(self, slot: Slot) -> memoryview:
        """Writable bytes of ``slot`` (format 'B')."""

    def read_into(self, slot: Slot, out: memoryview) -> None:
        """Copies the block at ``slot`` into ``out``; FileNotFoundError when it moved."""
        out[:] = self.view(slot)

    def write(self, slot: Slot, data: memoryview, meta: BlockMeta) -> None:
        """Stores ``data`` at ``slot`` (a demotion's or a promotion's copy)."""
        self.view(slot)[:] = data

    def read_many_into(self, slots: list[Slot], outs: list[memoryview]) -> None:
        """``read_into`` for several blocks (a device tier waits once for them all)."""
        for slot, out in zip(slots, outs, strict=True):
            self.read_into(slot, out)

    def write_many(self, slots: list[Slot], datas: list[memoryview],
                   metas: list[BlockMeta]) -> None:
        """``write`` for several blocks (a device tier waits once for them all)."""
        for slot, data, meta in zip(slots, datas, metas, strict=True):
            self.write(slot, data, meta)

    def checksums(self, slots: list[Slot]) -> list[int]:
        """``checksum`` of several blocks (a device tier computes them in one launch)."""
        return [self.checksum(slot) for slot in slots]

    def checksum(self, slot: Slot) -> int:
        """The checksum of the bytes at ``slot`` now, of this tier's ``checksum_kind``."""
        if self.has_view:
            return crc32(self.view(slot))
        out = memoryview(bytearray(slot.length))
        self.read_into(slot, out)
        return crc32(out)

    def sync(self) -> None:  # noqa: B027 (optional hook)
        """Makes the writes done so far durable (a disk tier fsyncs its directory)."""

    def scan(self) -> list[Found]:
        """Blocks a persistent tier holds from before this process, oldest first."""
        return []

    def footprint(self, nbytes: int) -> int:
        """How many bytes of capacity a block of ``nbytes`` takes (alignment included)."""
        return nbytes

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases the tier's memory (and, for shared memory, unlinks it)."""
