"""Moves under way and the puts that meet them. A device put meets a gpu tier whose
room is being made: blocks being demoted out of it (by the demoter, or another put)
free their slots when their copies land. The put waits for them and lands in the gpu
tier; it spills into the cpu tier only when even those moves would not make its room,
or when they are late. (A put that spilled while the demoter was still copying landed
in the slower tier for nothing, and the next one found the room free.) A move whose
copy raises ends as a failed one: nothing stays moving or counted as leaving. A block
moved while a reader reads it in place keeps its old slot until the reader lets go.
Over gRPC, a put waits only within its caller's deadline, and one whose caller went
away while it waited is dropped.

The gpu tier runs on the CPU here; its demotions are held mid-copy by a gate on the
checksums they start with."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from kvstore import puts
from kvstore.store import BegunPut, KVStoreCore
from kvstore.tiers.base import Slot
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.gpu import GpuTier
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from tests.fixtures.device_puts import write_device_put
from tests.fixtures.store_books import settled
from tests.fixtures.store_server import served as serve

BLOCK = 1024
GPU_BLOCKS = 4


class GatedGpuTier(GpuTier):
    """A gpu tier whose demotions wait at their first step until the gate opens."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes, device="cpu")
        self.gate = threading.Event()
        self.gate.set()

    def checksums(self, slots: list[Slot]) -> list[int]:
        assert self.gate.wait(timeout=10), "the test never opened the gate"
        return super().checksums(slots)


@pytest.fixture
def core() -> Iterator[KVStoreCore]:
    store = KVStoreCore([GatedGpuTier(GPU_BLOCKS * BLOCK), CpuTier(16 * BLOCK, shm=False)])
    yield store
    store.tiers[0].gate.set()
    store.close()


def payload(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


def begin(core: KVStoreCore, owner: str, keys: list[bytes]) -> BegunPut:
    return core.begin_put(owner, [common_pb2.BlockRef(key=k, num_tokens=16) for k in keys],
                          BLOCK, device=True)


def write_and_commit(core: KVStoreCore, begun: BegunPut, keys: list[bytes]) -> None:
    """The writer's side: each block into the slot it got, committed with its dsum32."""
    write_device_put(core, begun, [payload(k[0]) for k in keys])


def keys_from(start: int, n: int) -> list[bytes]:
    return [bytes([start + i]) * 16 for i in range(n)]


def demoting(core: KVStoreCore, pool: ThreadPoolExecutor, blocks: int) -> Future:
    """A full gpu tier of unpinned blocks, ``blocks`` of them being demoted (held by the
    gate) -> the demotion's future."""
    cold = keys_from(1, GPU_BLOCKS)
    write_and_commit(core, begin(core, "cold", cold), cold)
    core.release("cold")
    core.tiers[0].gate.clear()
    mark = (GPU_BLOCKS - blocks) / GPU_BLOCKS  # the full tier is past it: down to it
    core.set_watermarks(mark, mark)
    moving = pool.submit(core.demote_to_watermark)
    while core.stats().moves_pending < blocks:
        assert not moving.done(), moving.exception()
        time.sleep(0.001)
    return moving


def moved(core: KVStoreCore, moving: Future) -> None:
    """The demotion done, and no more of them (the books are checked at the end)."""
    moving.result(timeout=10)
    core.set_watermarks(1.0, 1.0)


def _leak_free(core: KVStoreCore) -> None:
    """Nothing pinned, pending or moving once the writer lets go (and the store has
    stamped a spilled put's crc32s)."""
    core.release("warm")
    s = settled(core)
    assert (s.pins, s.pinned_blocks, s.pending_puts, s.moves_pending) == (0, 0, 0, 0)


def test_a_put_waits_for_the_demotions_that_make_its_room(core: KVStoreCore) -> None:
    with ThreadPoolExecutor(2) as pool:
        moving = demoting(core, pool, blocks=3)
        warm = keys_from(100, 2)
        # free 0, unpinned and not moving 1: a put that did not wait for the 3 blocks
        # under way would spill before the gate opens
        opens = threading.Timer(0.2, core.tiers[0].gate.set)
        opens.start()
        begun = begin(core, "warm", warm)
        opens.join()
        moved(core, moving)
    assert not begun.spilled
    assert {s.tier for s in begun.slots} == {"gpu"}
    write_and_commit(core, begun, warm)
    got = core.get("warm", warm, memory=True, device=True)
    assert [loc.tier for loc in got] == ["gpu", "gpu"]
    _leak_free(core)


def test_a_put_the_moves_cannot_make_room_for_spills_at_once(core: KVStoreCore) -> None:
    with ThreadPoolExecutor(2) as pool:
        moving = demoting(core, pool, blocks=1)
        warm = keys_from(100, GPU_BLOCKS + 1)  # more than the whole gpu tier
        begun = pool.submit(begin, core, "warm", warm).result(timeout=5)  # gate still shut
        assert not moving.done()
        core.tiers[0].gate.set()
        moved(core, moving)
    assert begun.spilled
    assert {s.tier for s in begun.slots} == {"cpu"}
    write_and_commit(core, begun, warm)
    _leak_free(core)


def test_a_put_whose_room_is_late_spills_after_its_wait(core: KVStoreCore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(puts, "MOVES_WAIT_S", 0.2)
    with ThreadPoolExecutor(2) as pool:
        moving = demoting(core, pool, blocks=3)
        # the one block not moving is pinned: the put has nothing to demote itself
        assert core.pin("keep", keys_from(1, GPU_BLOCKS)[-1:]) == 1
        warm = keys_from(100, 2)
        t0 = time.monotonic()
        begun = begin(core, "warm", warm)  # the gate stays shut: the demotion is stuck
        waited = time.monotonic() - t0
        core.tiers[0].gate.set()
        moved(core, moving)
    assert begun.spilled and waited >= 0.2
    write_and_commit(core, begun, warm)
    core.release("keep")
    _leak_free(core)


def test_a_move_whose_copy_raises_ends_and_frees_its_target(core: KVStoreCore) -> None:
    cold = keys_from(1, GPU_BLOCKS)
    write_and_commit(core, begin(core, "cold", cold), cold)
    core.release("cold")

    def broken(slots: list[Slot]) -> list[int]:
        raise RuntimeError("the device went away")

    core.tiers[0].checksums = broken
    core.set_watermarks(0.5, 0.5)
    with pytest.raises(RuntimeError, match="went away"):
        core.demote_to_watermark()
    s = core.stats()
    assert s.moves_pending == 0 and core.tiers[1].used_bytes == 0
    assert set(core._leaving.values()) == {0}
    assert [loc.tier for loc in core.get("", cold)] == ["gpu"] * GPU_BLOCKS


def _raises(*_args: object, **_kw: object) -> None:
    raise RuntimeError("a bug in the books")


def _nothing_under_way(core: KVStoreCore) -> None:
    assert core.stats().moves_pending == 0
    assert set(core._leaving.values()) == {0}


def test_moves_planned_before_a_failure_in_the_planning_are_abandoned(
        core: KVStoreCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demoter planned its moves out of the gpu tier; an error after that (here in
    the eviction that ends the planning) leaves none of them under way."""
    cold = keys_from(1, GPU_BLOCKS)
    write_and_commit(core, begin(core, "cold", cold), cold)
    core.release("cold")
    monkeypatch.setattr(core, "_evict", _raises)
    core.set_watermarks(0.5, 0.5)
    with pytest.raises(RuntimeError, match="bug in the books"):
        core.demote_to_watermark()
    _nothing_under_way(core)
    assert core.tiers[1].used_bytes == 0  # the targets' slots are free again
    assert [loc.tier for loc in core.get("", cold)] == ["gpu"] * GPU_BLOCKS


def test_promotions_started_before_a_failure_to_make_room_are_abandoned(
        core: KVStoreCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two blocks raised into a gpu tier with room for one: the first one's move is
    planned, then making room for the second fails; the first is not left under way."""
    core.put("", [common_pb2.BlockRef(key=k, num_tokens=16) for k in keys_from(1, 2)],
             [payload(1), payload(2)], BLOCK)  # host writer: the cpu tier
    held = keys_from(10, GPU_BLOCKS - 1)
    write_and_commit(core, begin(core, "hold", held), held)  # one gpu slot left
    monkeypatch.setattr(core, "_make_room", _raises)
    with pytest.raises(RuntimeError, match="bug in the books"):
        core.promote(keys_from(1, 2))
    _nothing_under_way(core)
    assert core.tiers[0].used_bytes == (GPU_BLOCKS - 1) * BLOCK
    assert [loc.tier for loc in core.get("", keys_from(1, 2))] == ["cpu", "cpu"]
    core.release("hold")


def test_a_promotion_under_an_in_place_reader_keeps_its_old_slot_until_it_lets_go(
        core: KVStoreCore) -> None:
    """A host reader pinned a cpu-tier block and reads it in the arena, where it is; a
    Prefetch raises the block into the gpu tier meanwhile. The old slot stays the
    reader's (a new put cannot take it) until the reader lets go."""
    cpu = core.tiers[1]
    key, other = keys_from(1, 1)[0], keys_from(50, 1)[0]
    core.put("", [common_pb2.BlockRef(key=key, num_tokens=16)], [payload(7)], BLOCK)
    loc = core.get("reader", [key], memory=True)[0]
    assert loc.tier == "cpu"
    assert core.promote([key]) == (1, 0, 0, 0)
    core.put("", [common_pb2.BlockRef(key=other, num_tokens=16)], [payload(9)], BLOCK)
    assert bytes(core.view(loc)) == payload(7)  # the reader's bytes, still
    assert cpu.used_bytes == 2 * BLOCK
    core.release("reader")
    assert cpu.used_bytes == BLOCK  # only the new put's block
    assert [got.tier for got in core.get("", [key, other])] == ["gpu", "cpu"]
    _leak_free(core)


@pytest.fixture
def served(core: KVStoreCore) -> Iterator[kvstore_pb2_grpc.KVStoreStub]:
    with serve(core, "moves") as stub:
        yield stub


def _begin_request(keys: list[bytes]) -> kvstore_pb2.BeginPutRequest:
    return kvstore_pb2.BeginPutRequest(
        owner="warm", blocks=[common_pb2.BlockRef(key=k, num_tokens=16) for k in keys],
        block_nbytes=BLOCK, packed=True, device=True)


def test_a_put_waits_for_room_only_within_its_callers_deadline(
        core: KVStoreCore, served: kvstore_pb2_grpc.KVStoreStub) -> None:
    with ThreadPoolExecutor(2) as pool:
        moving = demoting(core, pool, blocks=3)
        core.pin("keep", keys_from(1, GPU_BLOCKS)[-1:])  # nothing for the put to demote
        begun = served.BeginPut(_begin_request(keys_from(100, 2)), timeout=1.5)
        core.tiers[0].gate.set()
        moved(core, moving)
    assert begun.spilled  # answered in time, where there was room then
    served.CommitPut(kvstore_pb2.CommitPutRequest(put_id=begun.put_id, abort=True))
    core.release("keep")
    _leak_free(core)


def test_a_put_whose_caller_went_away_while_it_waited_is_dropped(
        core: KVStoreCore, served: kvstore_pb2_grpc.KVStoreStub) -> None:
    with ThreadPoolExecutor(2) as pool:
        moving = demoting(core, pool, blocks=3)
        call = served.BeginPut.future(_begin_request(keys_from(100, 2)))
        time.sleep(0.1)
        call.cancel()
        time.sleep(0.3)  # the cancellation reaches the store's side of the call
        core.tiers[0].gate.set()  # the room comes: the store answers nobody
        moved(core, moving)
    deadline = time.monotonic() + 5
    while core.stats().pending_puts and time.monotonic() < deadline:
        time.sleep(0.01)
    _leak_free(core)
