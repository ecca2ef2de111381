"""A spilled put's crc32s, stamped by the store after the commit (kvstore.stamps): device
readers verify the writer's dsum32 at once; the store's thread stamps the crc32 of the
bytes that landed; a host reader, a move to disk and a promotion meet a block still
waiting and do not count it as corrupt. The gpu tier runs on the CPU here."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from kvstore.store import KVStoreCore
from kvstore.tiers import build_tiers
from kvstore.tiers.base import Slot
from services.transfer.contract.checksum import crc32
from splitserve.v1 import common_pb2
from tests.fixtures.device_puts import dsum, write_device_put
from tests.fixtures.store_books import settled

NBYTES = 4096


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def make_store() -> Iterator[Callable[..., KVStoreCore]]:
    """Stores of a gpu tier (2 blocks) before a cpu tier (4), and a disk tier when given
    a folder; closed after the test, passed or not."""
    made: list[KVStoreCore] = []

    def make(tmp_path=None, stamper: bool = True) -> KVStoreCore:
        specs = [{"kind": "gpu", "bytes": 2 * NBYTES, "device": "cpu"},
                 {"kind": "cpu", "bytes": 4 * NBYTES, "shm": False}]
        if tmp_path is not None:
            specs.append({"kind": "disk", "bytes": 16 * NBYTES, "path": str(tmp_path)})
        core = KVStoreCore(build_tiers(specs, "t"), promote_on_get=False)
        made.append(core)
        core.set_watermarks(1.0, 1.0)
        if not stamper:  # every block stays waiting until a reader or a move stamps it
            core._stamp_later = lambda blocks: None
        return core

    yield make
    for core in made:
        core.close()


def _fill_gpu_tier(core: KVStoreCore) -> None:
    """Two device blocks pinned by their owner: the gpu tier has no room left."""
    refs = [common_pb2.BlockRef(key=_key(100 + i), num_tokens=16) for i in range(2)]
    begun = core.begin_put("holder", refs, NBYTES, device=True)
    tier = core.device_tier
    sums = [tier.checksum(Slot(s.offset, s.length)) for s in begun.slots]
    core.commit_put(begun.put_id, sums)


def _spill(core: KVStoreCore, keys: list[int]) -> dict[int, bytes]:
    """A device writer's put that spills into the cpu tier, committed with the writer's
    dsum32s only (what the cuda_ipc transport sends)."""
    data = {i: os.urandom(NBYTES) for i in keys}
    refs = [common_pb2.BlockRef(key=_key(i), num_tokens=16) for i in keys]
    begun = core.begin_put("w", refs, NBYTES, device=True)
    assert begun.spilled
    assert write_device_put(core, begun, list(data.values())) == (len(keys), 0)
    return data


def test_the_store_stamps_a_spilled_blocks_crc32_after_the_commit(make_store):
    core = make_store()
    _fill_gpu_tier(core)
    data = _spill(core, [1, 2])
    (loc,) = core.get("d", [_key(1)], memory=True, device=True)
    assert loc.tier == "cpu" and loc.device_checksum == dsum(data[1])
    core.release("d")
    settled(core, poll_s=0.01)
    assert core.stats().moves_pending == 0
    locs = core.get("d", [_key(1), _key(2)], memory=True, device=True)
    assert [loc.checksum for loc in locs] == [crc32(data[1]), crc32(data[2])]
    core.release("d")
    core.release("w")
    core.release("holder")
    assert core.stats().pins == 0 and core.stats().checksum_failures == 0


def test_a_host_reader_stamps_a_block_still_waiting(make_store):
    core = make_store(stamper=False)
    _fill_gpu_tier(core)
    data = _spill(core, [1, 2])
    locs = core.get("r", [_key(1), _key(2)], memory=True)
    assert [loc.checksum for loc in locs] == [crc32(data[1]), crc32(data[2])]
    assert all(core.check(loc) for loc in locs)
    assert [bytes(core.view(loc)) for loc in locs] == [data[1], data[2]]
    core.release("r")
    core.release("w")
    core.release("holder")
    s = core.stats()
    assert s.pins == 0 and s.checksum_failures == 0 and s.moves_pending == 0


def test_a_waiting_block_moves_to_disk_and_up_to_the_gpu_tier_intact(tmp_path, make_store):
    """Demoted to disk, a waiting block is written with the crc32 of its bytes (not
    refused as corrupt); promoted from host memory it is verified by its dsum32."""
    core = make_store(tmp_path, stamper=False)
    _fill_gpu_tier(core)
    data = _spill(core, [1, 2, 3, 4])  # the cpu tier is full
    core.release("w")
    core.put("", [common_pb2.BlockRef(key=_key(5), num_tokens=16)], [bytes(NBYTES)], NBYTES)
    core.put("", [common_pb2.BlockRef(key=_key(6), num_tokens=16)], [bytes(NBYTES)], NBYTES)
    core.release("holder")
    assert core.promote([_key(3)], core.home(True))[0] == 1
    locs = core.get("r", [_key(i) for i in (1, 2, 3, 4)])
    assert [loc.tier for loc in locs][:3] == ["disk", "disk", "gpu"]
    assert [bytes(core.read(loc)) for loc in locs] == [data[i] for i in (1, 2, 3, 4)]
    assert all(core.check(loc) for loc in locs)
    core.release("r")
    s = core.stats()
    assert s.pins == 0 and s.checksum_failures == 0
