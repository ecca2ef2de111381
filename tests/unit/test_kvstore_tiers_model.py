"""A hypothesis state machine: the tiered index (cpu + disk, real files) against a
model of what it must hold — put, get/pin, release, lookup, prefetch under pressure.

The model is a dict key -> bytes of the blocks the store may still hold, and the set
of pinned keys. Invariants: a pinned block is held with its bytes, never demoted nor
evicted under its reader (it may be raised); a shm read gets a cpu block; the
per-tier lookup agrees with where the blocks are; used bytes and files add up.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.store import KVStoreCore, Location, NotFound, ResourceExhausted
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from splitserve.v1 import common_pb2
from tests.fixtures.store_books import lingering_bytes

BLOCK = 512
KEYS = [f"k{i}".encode().ljust(16, b".") for i in range(12)]
OWNERS = ["a", "b"]


def data(k: bytes, gen: int = 0) -> bytes:
    return (k + bytes([gen])) * (BLOCK // 17) + b"\0" * (BLOCK % 17)


class TieredIndex(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kv-model-")
        self.cpu = CpuTier(4 * BLOCK)
        self.disk = DiskTier(5 * DiskTier.footprint(None, BLOCK), self.dir, fsync=False)
        self.core = KVStoreCore([self.cpu, self.disk], promote_on_get=False)
        self.bytes: dict[bytes, bytes] = {}  # what was put (the store may have dropped it)
        self.pins: dict[str, set[bytes]] = {o: set() for o in OWNERS}
        self.floor: dict[bytes, int] = {}  # the slowest tier a pinned block was seen in
        # cpu-arena locations readers were handed: they read there until they let go
        self.handed: dict[str, dict[bytes, Location]] = {o: {} for o in OWNERS}

    def teardown(self) -> None:
        self.core.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pinned(self) -> set[bytes]:
        return set().union(*self.pins.values())

    def cpu_all_pinned(self) -> bool:
        return sum(1 for b in self.core._blocks.values()
                   if b.pinners and b.tier is self.cpu) == 4

    def pin(self, owner: str, k: bytes) -> None:
        self.pins[owner].add(k)
        self.floor[k] = max(self.floor.get(k, 0), self.rank(k))

    def rank(self, k: bytes) -> int:
        return self.core.tiers.index(self.core._blocks[k].tier)

    @rule(k=st.sampled_from(KEYS), owner=st.sampled_from(["", *OWNERS]))
    def put(self, k: bytes, owner: str) -> None:
        payload = self.bytes.get(k, data(k))
        try:
            self.core.put(owner, [common_pb2.BlockRef(key=k, num_tokens=16)], [payload],
                          BLOCK)
        except ResourceExhausted:
            assert self.cpu_all_pinned()  # refused only when the cpu tier is all pinned
            return
        self.bytes[k] = payload
        if owner:
            self.pin(owner, k)

    @rule(k=st.sampled_from(KEYS), owner=st.sampled_from(OWNERS), shm=st.booleans())
    def get(self, k: bytes, owner: str, shm: bool) -> None:
        try:
            (loc,) = self.core.get(owner, [k], memory=shm)
        except NotFound:
            assert k not in self.pinned()
            return
        except ResourceExhausted:
            assert shm and self.cpu_all_pinned()
            return
        assert bytes(self.core.read(loc)) == self.bytes[k]
        if shm:
            assert loc.tier == "cpu"
        if loc.tier == "cpu":
            self.handed[owner][k] = loc
        self.pin(owner, k)

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        self.core.release(owner)
        self.pins[owner].clear()
        self.handed[owner].clear()
        for k in set(self.floor) - self.pinned():
            del self.floor[k]

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=4))
    def prefetch(self, keys: list[bytes]) -> None:
        raised, resident, missing, failed = self.core.promote(keys)
        assert raised + resident + missing + failed == len(keys)

    @precondition(lambda self: self.bytes)
    @rule(n=st.integers(1, 6))
    def lookup(self, n: int) -> None:
        keys = list(self.bytes)[:n]
        held, per_tier = self.core.lookup(keys)
        where = [self.tier_of(k) for k in keys[:held]]
        assert None not in where and (held == len(keys) or self.tier_of(keys[held]) is None)
        for name, count in per_tier.items():
            assert where[:count] == [name] * count and (count == held or
                                                         where[count] != name)

    def tier_of(self, k: bytes) -> str | None:
        b = self.core._blocks.get(k)
        return None if b is None else b.tier.name

    @invariant()
    def pinned_blocks_are_never_demoted_nor_evicted(self) -> None:
        for k in self.pinned():
            b = self.core._blocks[k]  # KeyError: evicted under its reader
            assert b.pinners and self.rank(k) <= self.floor[k]
            self.floor[k] = self.rank(k)  # it may go up (promotion), never down
            loc = self.core._location(b)
            assert bytes(self.core.read(loc)) == self.bytes[k]

    @invariant()
    def readers_read_their_blocks_where_they_were_told(self) -> None:
        for handed in self.handed.values():
            for k, loc in handed.items():
                assert bytes(self.core.view(loc)) == self.bytes[k]

    @invariant()
    def books_balance(self) -> None:
        blocks = list(self.core._blocks.values())
        assert all(not b.moving for b in blocks)
        assert set(self.core._leaving.values()) == {0}  # no move under way is left counted
        for t in (self.cpu, self.disk):
            mine = [b for b in blocks if b.tier is t]
            assert t.used_bytes == sum(t.footprint(b.slot.length) for b in mine) + \
                lingering_bytes(self.core, t)
            assert t.used_bytes <= t.capacity_bytes
        assert len(list(self.disk.path.glob("*.kv"))) == sum(b.tier is self.disk
                                                             for b in blocks)
        s = self.core.stats()
        assert s.pins == sum(len(p) for p in self.pins.values())


TieredIndex.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                         deadline=None)
TestTieredIndex = TieredIndex.TestCase
