"""A hypothesis state machine: the index over a gpu tier (on the CPU here) and a cpu
tier, against a model, with device writers as the cuda_ipc transport is one: puts that
land in the gpu tier or, when its blocks are all pinned, spill into the cpu tier (their
crc32s stamped by the store later; with a landing pad, committed before their copies
land, or dropped when the token never comes), device and host reads, releases and
promotions.

Invariants: a pinned block is held with its bytes and never leaves the index; a block
a reader is handed verifies with the checksum it is handed (a host reader's crc32, a
device reader's dsum32), and its bytes stay where the reader was told until it lets go;
pins and used bytes add up; every landing pad comes back.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore.store import KVStoreCore, NotFound, ResourceExhausted
from kvstore.tiers import build_tiers
from kvstore.tiers.base import Slot
from kvstore.types import DeadlineExceeded
from services.transfer.contract.arena import LANDING_PADS
from services.transfer.contract.checksum import crc32
from splitserve.v1 import common_pb2
from tests.fixtures.device_puts import dsum, write_device_put
from tests.fixtures.store_books import lingering_bytes, settled

BLOCK = 512
KEYS = [f"g{i}".encode().ljust(16, b".") for i in range(10)]
OWNERS = ["a", "b"]


def data(k: bytes) -> bytes:
    return (k + b"!") * (BLOCK // 17) + b"\0" * (BLOCK % 17)


class GpuTieredIndex(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        tiers = build_tiers([{"kind": "gpu", "bytes": 3 * BLOCK, "device": "cpu"},
                             {"kind": "cpu", "bytes": 5 * BLOCK, "shm": False}], "m")
        self.gpu, self.cpu = tiers
        self.core = KVStoreCore(tiers)  # promotions on release, demotion by watermarks:
        self.core.set_watermarks(0.9, 0.8)  # the store's defaults, on its threads
        self.held: set[bytes] = set()  # put once (the store may have dropped them since)
        self.pins: dict[str, set[bytes]] = {o: set() for o in OWNERS}
        # where each reader was told its blocks are: it may read them there until it
        # lets go, whatever moves meanwhile
        self.handed: dict[str, dict[bytes, tuple[str, int, int]]] = {o: {} for o in OWNERS}

    def teardown(self) -> None:
        self.settle()
        self.core.close()

    def pinned(self) -> set[bytes]:
        return set().union(*self.pins.values())

    def bytes_of(self, tier: str, offset: int, length: int) -> bytes:
        slot = Slot(offset, length)
        if tier == self.gpu.name:
            return bytes(self.gpu.span(slot).numpy())
        return bytes(self.cpu.view(slot))

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
          owner=st.sampled_from(["", *OWNERS]), landing=st.booleans(), lands=st.booleans())
    def device_put(self, keys: list[bytes], owner: str, landing: bool, lands: bool) -> None:
        """``landing``: the writer asks for a landing pad (a spilled put gets one) and
        commits before its copies land; ``lands``: its token comes (else the writer
        died after its copies, and the commit drops the put)."""
        refs = [common_pb2.BlockRef(key=k, num_tokens=16) for k in keys]
        try:
            begun = self.core.begin_put(owner, refs, BLOCK, device=True, landing=landing)
        except ResourceExhausted:
            return  # both tiers full of pinned blocks
        if begun.pad is not None and not lands:
            for s in begun.slots:
                if not s.present:
                    self.core.view(s)[:] = bytes(BLOCK)  # copies of a writer that died
            with pytest.raises(DeadlineExceeded):
                self.core.commit_put(begun.put_id, [0] * len(keys), landing=True, wait_s=0)
            if owner:  # the blocks it found held were pinned at its begin, and stay so
                self.pins[owner].update(k for k, s in zip(keys, begun.slots, strict=True)
                                        if s.present)
            return
        write_device_put(self.core, begun, [data(k) for k in keys])
        self.held.update(keys)
        if owner:
            self.pins[owner].update(keys)

    @rule(k=st.sampled_from(KEYS), owner=st.sampled_from(["", *OWNERS]))
    def host_put(self, k: bytes, owner: str) -> None:
        try:
            self.core.put(owner, [common_pb2.BlockRef(key=k, num_tokens=16)], [data(k)],
                          BLOCK)
        except ResourceExhausted:
            return
        self.held.add(k)
        if owner:
            self.pins[owner].add(k)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
          owner=st.sampled_from(OWNERS), device=st.booleans())
    def get(self, keys: list[bytes], owner: str, device: bool) -> None:
        try:
            locs = self.core.get(owner, keys, memory=True, device=device)
        except NotFound:
            assert not set(keys) <= self.pinned()
            return
        except ResourceExhausted:
            assert not device  # no room in the cpu tier to move gpu blocks into
            return
        for k, loc in zip(keys, locs, strict=True):
            got = self.bytes_of(loc.tier, loc.offset, loc.length)
            assert got == data(k)
            if device and loc.device_checksum is not None:  # verified on the device
                assert loc.device_checksum == dsum(got)
            elif device:  # a host writer's block: its crc32, on host threads
                assert loc.tier == self.cpu.name and loc.checksum == crc32(got)
            else:
                assert loc.tier == self.cpu.name and loc.checksum == crc32(got)
            self.handed[owner][k] = (loc.tier, loc.offset, loc.length)
        self.pins[owner].update(keys)

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        self.core.release(owner)
        self.pins[owner].clear()
        self.handed[owner].clear()

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def promote(self, keys: list[bytes]) -> None:
        raised, resident, missing, failed = self.core.promote(keys, self.core.home(True))
        assert raised + resident + missing + failed == len(keys)

    def settle(self) -> None:
        """Waits for the store's background moves and stamps (the books balance once
        they are done; a move holds a slot in each tier meanwhile). Generous: a loaded
        machine may take seconds over one."""
        s = settled(self.core, timeout_s=30)
        moving = [(b.key, b.tier.name) for b in self.core._blocks.values() if b.moving]
        assert not s.moves_pending, f"still under way after 30 s: {moving}, {s}"

    @invariant()
    def pinned_blocks_stay_with_their_bytes(self) -> None:
        self.settle()
        for k in self.pinned():
            b = self.core._blocks[k]  # KeyError: a pinned block left the index
            assert b.pinners
            loc = self.core._location(b)
            assert self.bytes_of(loc.tier, loc.offset, loc.length) == data(k)

    @invariant()
    def readers_read_their_blocks_where_they_were_told(self) -> None:
        for handed in self.handed.values():
            for k, where in handed.items():
                assert self.bytes_of(*where) == data(k)

    @invariant()
    def books_balance(self) -> None:
        self.settle()
        blocks = list(self.core._blocks.values())
        for t in (self.gpu, self.cpu):
            mine = [b for b in blocks if b.tier is t]
            assert t.used_bytes == sum(t.footprint(b.slot.length) for b in mine) + \
                lingering_bytes(self.core, t)
        assert all(b.pinners for b in self.core._lingering)  # freed with the last pin
        s = self.core.stats()
        assert s.pins == sum(len(p) for p in self.pins.values())
        assert s.checksum_failures == 0
        assert set(self.core._leaving.values()) == {0}  # no move under way is left counted
        assert self.core._pads is not None
        assert self.core._pads.free == LANDING_PADS  # every put ended gave its pad back


GpuTieredIndex.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestGpuTieredIndex = GpuTieredIndex.TestCase
