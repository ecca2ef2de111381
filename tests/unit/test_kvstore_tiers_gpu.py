"""The gpu tier in the store's index: where device and host writers' blocks land, how
blocks move between the gpu tier and host tiers (checked and re-stamped with the other
checksum kind), and what a reader of each kind is handed. The tier runs on the CPU
here (``device: cpu``): the same code as on a GPU, without CUDA IPC."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvstore.store import InvalidArgument, KVStoreCore
from kvstore.tiers import build_tiers
from kvstore.tiers.base import Slot
from kvstore.tiers.gpu import GpuTier, host_runs
from services.transfer.contract.checksum import crc32
from services.transfer.contract.device_checksum import dsum32
from services.transfer.device_copy import checksum_blocks, copy_blocks
from splitserve.v1 import common_pb2
from tests.fixtures.store_books import settled

NBYTES = 4096


def _payload(i: int) -> bytes:
    return os.urandom(NBYTES - 8) + i.to_bytes(8, "little")


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _store(gpu_blocks: int = 4, cpu_blocks: int = 8) -> KVStoreCore:
    tiers = build_tiers([{"kind": "gpu", "bytes": gpu_blocks * NBYTES, "device": "cpu"},
                         {"kind": "cpu", "bytes": cpu_blocks * NBYTES, "shm": False}], "t")
    core = KVStoreCore(tiers, promote_on_get=False)
    core.set_watermarks(1.0, 1.0)
    return core


def _device_put(core: KVStoreCore, owner: str, items: dict[int, bytes]) -> None:
    """What the cuda_ipc transport does: reserve in the gpu tier, copy, dsum32, commit."""
    refs = [common_pb2.BlockRef(key=_key(i), num_tokens=16) for i in items]
    begun = core.begin_put(owner, refs, NBYTES, device=True)
    tier = core.device_tier
    sums = []
    for s, data in zip(begun.slots, items.values(), strict=True):
        assert s.tier == "gpu"
        tier.span(Slot(s.offset, s.length)).copy_(torch.frombuffer(bytearray(data),
                                                                   dtype=torch.uint8))
        sums.append(tier.checksum(Slot(s.offset, s.length)))
    core.commit_put(begun.put_id, sums)


def _bytes(core: KVStoreCore, loc) -> bytes:
    return bytes(core.read(loc))


def test_device_checksum_agrees_between_kernel_and_torch_and_catches_changes():
    rows = torch.randint(0, 256, (3, NBYTES), dtype=torch.uint8)
    flat = rows.reshape(-1)
    out = torch.zeros_like(flat)
    sums = copy_blocks(flat, [0, NBYTES, 2 * NBYTES], out, [2 * NBYTES, 0, NBYTES], NBYTES)
    assert sums == dsum32(rows)
    assert torch.equal(out[2 * NBYTES:], flat[:NBYTES])
    assert checksum_blocks(flat, [NBYTES], NBYTES) == [sums[1]]
    flipped = rows.clone()
    flipped[0, 100] ^= 4
    swapped = rows.clone()
    swapped[1, 0:4], swapped[1, 4:8] = rows[1, 4:8].clone(), rows[1, 0:4].clone()
    assert dsum32(flipped)[0] != sums[0] and dsum32(swapped)[1] != sums[1]
    with pytest.raises(ValueError, match="4-byte words"):
        dsum32(torch.zeros((1, 6), dtype=torch.uint8))


def test_device_writers_land_in_the_gpu_tier_and_host_writers_in_the_cpu_tier():
    core = _store()
    data = {i: _payload(i) for i in range(3)}
    _device_put(core, "", {0: data[0], 1: data[1]})
    core.put("", [common_pb2.BlockRef(key=_key(2))], [data[2]], NBYTES)
    locs = core.get("", [_key(i) for i in range(3)])
    assert [loc.tier for loc in locs] == ["gpu", "gpu", "cpu"]
    assert [_bytes(core, loc) for loc in locs] == [data[0], data[1], data[2]]
    assert core.check(locs[0]) and core.check(locs[2])  # each with its own kind


def test_a_host_reader_gets_gpu_blocks_moved_to_the_cpu_tier_with_crc32():
    core = _store()
    data = {i: _payload(i) for i in range(2)}
    _device_put(core, "", data)
    locs = core.get("reader", [_key(0), _key(1)], memory=True)
    assert [loc.tier for loc in locs] == ["cpu", "cpu"]
    for i, loc in enumerate(locs):
        assert bytes(core.view(loc)) == data[i] and crc32(core.view(loc)) == loc.checksum
    core.release("reader")
    s = core.stats()
    assert s.pins == 0 and s.checksum_failures == 0
    assert core.device_tier.used_bytes == 0


def test_a_device_reader_maps_both_arenas_and_promotes_into_the_gpu_tier():
    core = _store()
    data = _payload(7)
    core.put("", [common_pb2.BlockRef(key=_key(7))], [data], NBYTES)
    (loc,) = core.get("r", [_key(7)], memory=True, device=True)
    assert loc.tier == "cpu"  # mapped where it is: nothing moved under the reader
    core.release("r")
    assert core.promote([_key(7)], core.home(True)) == (1, 0, 0, 0)
    (loc,) = core.get("", [_key(7)])
    assert loc.tier == "gpu" and _bytes(core, loc) == data
    assert loc.checksum == dsum32(torch.frombuffer(bytearray(data), dtype=torch.uint8))[0]


def test_a_full_gpu_tier_demotes_its_coldest_blocks_to_the_cpu_tier():
    core = _store(gpu_blocks=2)
    data = {i: _payload(i) for i in range(5)}
    for i in range(5):
        _device_put(core, "", {i: data[i]})
    locs = core.get("", [_key(i) for i in range(5)])
    assert [loc.tier for loc in locs] == ["cpu", "cpu", "cpu", "gpu", "gpu"]
    assert [_bytes(core, loc) for loc in locs] == [data[i] for i in range(5)]
    assert all(core.check(loc) for loc in locs)
    assert core.stats().demotions == 3


def test_a_demotion_batch_drops_its_corrupt_block_and_moves_the_others_whole():
    core = _store(gpu_blocks=4)
    data = {i: _payload(i) for i in range(8)}
    _device_put(core, "", {i: data[i] for i in range(4)})
    (bad,) = core.get("", [_key(1)])
    core.device_tier.arena[bad.offset + 100] ^= 1
    _device_put(core, "", {i: data[i] for i in range(4, 8)})  # 4 demotions in one batch
    s = core.stats()
    assert s.demotions == 3 and s.checksum_failures == 1 and core.lookup([_key(1)])[0] == 0
    kept = [0, 2, 3, 4, 5, 6, 7]
    locs = core.get("", [_key(i) for i in kept])
    assert [loc.tier for loc in locs] == ["cpu"] * 3 + ["gpu"] * 4
    assert [_bytes(core, loc) for loc in locs] == [data[i] for i in kept]
    assert all(core.check(loc) for loc in locs)


def test_a_device_put_is_refused_when_both_memory_tiers_are_pinned_and_names_the_tier():
    core = _store(gpu_blocks=1, cpu_blocks=1)
    _device_put(core, "holder", {0: _payload(0)})
    core.put("holder", [common_pb2.BlockRef(key=_key(1))], [_payload(1)], NBYTES)
    refs = [common_pb2.BlockRef(key=_key(2), num_tokens=16)]
    with pytest.raises(Exception, match=r"cpu tier.*kvstore.tiers\[1\]"):
        core.begin_put("", refs, NBYTES, device=True)
    core.release("holder")
    s = core.stats()
    assert s.pins == 0 and s.puts_refused == 1


def test_a_corrupted_gpu_block_is_never_moved_or_served():
    core = _store()
    _device_put(core, "", {0: _payload(0)})
    (loc,) = core.get("", [_key(0)])
    core.device_tier.arena[loc.offset + 10] ^= 1
    assert core.verified(loc) is None  # GetBlocks' check, on the device
    assert core.lookup([_key(0)])[0] == 0
    _device_put(core, "", {1: _payload(1)})
    (loc1,) = core.get("", [_key(1)])
    core.device_tier.arena[loc1.offset] ^= 1
    assert core.get("r", [_key(1)], memory=True, prefix=True) == []  # not raised
    s = core.stats()
    assert s.checksum_failures == 2 and s.blocks == 0 and s.pins == 0


def test_a_store_without_a_gpu_tier_refuses_device_clients():
    tiers = build_tiers([{"kind": "cpu", "bytes": 8 * NBYTES, "shm": False}], "t")
    core = KVStoreCore(tiers)
    with pytest.raises(InvalidArgument, match="no gpu tier"):
        core.begin_put("", [common_pb2.BlockRef(key=_key(0))], NBYTES, device=True)
    assert core.device_tier is None
    with pytest.raises(ValueError, match="needs a host memory tier"):
        KVStoreCore(build_tiers([{"kind": "gpu", "bytes": NBYTES, "device": "cpu"}], "t"))
    time.sleep(0)


def test_copy_blocks_refuses_a_block_outside_its_buffer():
    flat = torch.zeros(2 * NBYTES, dtype=torch.uint8)
    with pytest.raises(ValueError, match="runs outside"):
        copy_blocks(flat, [NBYTES + 4], torch.zeros_like(flat), [0], NBYTES)
    with pytest.raises(ValueError, match="runs outside"):
        copy_blocks(flat, [0], torch.zeros_like(flat), [-4], NBYTES)
    with pytest.raises(ValueError, match="4-byte words"):
        checksum_blocks(flat, [2], NBYTES)


def _dsum(data: bytes) -> int:
    return dsum32(torch.frombuffer(bytearray(data), dtype=torch.uint8))[0]


def test_demoted_blocks_keep_their_device_checksum_for_device_readers():
    core = _store(gpu_blocks=2)
    data = {i: _payload(i) for i in range(3)}
    for i in range(3):
        _device_put(core, "", {i: data[i]})
    (host, dev) = core.get("r", [_key(0), _key(2)], memory=True, device=True)
    assert (host.tier, dev.tier) == ("cpu", "gpu")
    assert host.checksum == crc32(data[0])  # host readers' kind
    assert host.device_checksum == _dsum(data[0]) and dev.device_checksum == _dsum(data[2])
    core.release("r")
    assert core.promote([_key(0)], core.home(True)) == (1, 0, 0, 0)
    (up,) = core.get("", [_key(0)])
    assert up.tier == "gpu" and _bytes(core, up) == data[0]
    assert core.stats().checksum_failures == 0


def test_a_raise_verified_by_device_checksum_drops_a_block_corrupted_in_host_memory():
    core = _store(gpu_blocks=2)
    data = {i: _payload(i) for i in range(3)}
    for i in range(3):
        _device_put(core, "", {i: data[i]})
    (host,) = core.get("", [_key(0)])
    core.view(host)[10] ^= 1  # after the store stamped it: only a check would see it
    assert core.promote([_key(0)], core.home(True))[0] == 0
    assert core.stats().checksum_failures == 1 and core.lookup([_key(0)])[0] == 0


def test_a_device_put_spills_to_the_cpu_tier_when_the_gpu_tier_is_all_pinned():
    core = _store(gpu_blocks=2)
    data = {i: _payload(i) for i in range(4)}
    _device_put(core, "holder", {0: data[0], 1: data[1]})  # pinned by their owner
    refs = [common_pb2.BlockRef(key=_key(i), num_tokens=16) for i in (2, 3)]
    begun = core.begin_put("w", refs, NBYTES, device=True)
    assert begun.spilled and [s.tier for s in begun.slots] == ["cpu", "cpu"]
    for s, i in zip(begun.slots, (2, 3), strict=True):
        core.view(s)[:] = data[i]
    assert core.commit_put(begun.put_id, [_dsum(data[2]), _dsum(data[3])]) == (2, 0)
    locs = core.get("", [_key(2), _key(3)])
    assert [loc.tier for loc in locs] == ["cpu", "cpu"]
    assert [loc.checksum for loc in locs] == [crc32(data[2]), crc32(data[3])]
    assert [loc.device_checksum for loc in locs] == [_dsum(data[2]), _dsum(data[3])]
    assert all(core.check(loc) for loc in locs)
    s = core.stats()
    assert s.puts_refused == 0 and s.checksum_failures == 0
    core.release("holder")
    core.release("w")
    assert core.stats().pins == 0


def _spilled_put(core: KVStoreCore, keys: list[int], datas: list[bytes]):
    refs = [common_pb2.BlockRef(key=_key(i), num_tokens=16) for i in keys]
    begun = core.begin_put("w", refs, NBYTES, device=True)
    assert begun.spilled
    for s, data in zip(begun.slots, datas, strict=True):
        core.view(s)[:] = data
    return begun


def test_a_spilled_put_keeps_the_crc32_its_writer_computed():
    """A device writer that checksums its spilled blocks as they land hands the crc32s
    to the commit: the store keeps them (a wrong one fails the block's check, as a host
    writer's would) and refuses a count that does not match."""
    core = _store(gpu_blocks=2)
    _device_put(core, "holder", {0: _payload(0), 1: _payload(1)})
    data = [_payload(2), _payload(3)]
    begun = _spilled_put(core, [2, 3], data)
    with pytest.raises(InvalidArgument, match="one host checksum per written block"):
        core.commit_put(begun.put_id, [_dsum(d) for d in data], [crc32(data[0])])
    wrong = crc32(data[1]) ^ 1
    assert core.commit_put(begun.put_id, [_dsum(d) for d in data],
                           [crc32(data[0]), wrong]) == (2, 0)
    locs = core.get("", [_key(2), _key(3)])
    assert [loc.checksum for loc in locs] == [crc32(data[0]), wrong]
    assert [loc.device_checksum for loc in locs] == [_dsum(d) for d in data]
    assert core.check(locs[0]) and not core.check(locs[1])
    core.release("holder")
    core.release("w")
    assert core.stats().pins == 0


def test_a_device_reader_of_host_blocks_has_them_raised_once_it_lets_go():
    """Read in place over the link, a demoted block is not raised into the gpu tier
    while its reader holds it (the copy would share the link with the read); its
    release raises it."""
    tiers = build_tiers([{"kind": "gpu", "bytes": 2 * NBYTES, "device": "cpu"},
                         {"kind": "cpu", "bytes": 8 * NBYTES, "shm": False}], "t")
    core = KVStoreCore(tiers)
    core.set_watermarks(1.0, 1.0)
    for i in range(3):
        _device_put(core, "", {i: _payload(i)})
    (loc,) = core.get("reader", [_key(0)], memory=True, device=True)
    assert loc.tier == "cpu"
    time.sleep(0.3)  # a promotion queued now would have run by then
    assert core.lookup([_key(0)])[1]["cpu"] == 1 and core.stats().promotions == 0
    core.release("reader")
    deadline = time.monotonic() + 5
    while core.stats().promotions == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert core.stats().promotions == 1
    (raised,) = core.get("", [_key(0)])
    assert raised.tier == "gpu"
    core.close()


def test_blocks_released_together_are_demoted_into_adjacent_slots_in_order():
    """A request's blocks, pinned in key order and released, leave the gpu tier in that
    order into one run of the cpu tier: a device reader then reads them with one DMA."""
    core = _store(gpu_blocks=8, cpu_blocks=32)
    first = {i: _payload(i) for i in range(8)}
    _device_put(core, "w", first)
    core.get("r", [_key(i) for i in range(8)], memory=True, device=True)
    core.release("r")
    core.release("w")
    _device_put(core, "", {i: _payload(i) for i in range(100, 108)})  # pushes them down
    locs = core.get("", [_key(i) for i in range(8)], memory=True, device=True)
    assert [loc.tier for loc in locs] == ["cpu"] * 8
    step = core.host.footprint(NBYTES)
    assert [loc.offset - locs[0].offset for loc in locs] == [i * step for i in range(8)]
    assert [_bytes(core, loc) for loc in locs] == list(first.values())


def test_moves_pending_counts_queued_promotions_until_they_are_done():
    core = _store()
    keys = [_key(i) for i in range(3)]
    core.put("", [common_pb2.BlockRef(key=k) for k in keys], [_payload(i) for i in range(3)],
             NBYTES)
    gate = threading.Event()
    promote = core.promote

    def held_back(*args):
        gate.wait(timeout=10)
        return promote(*args)

    core.promote = held_back
    core.promote_later(keys, core.home(True))
    assert core.stats().moves_pending == 3
    gate.set()
    assert settled(core, timeout_s=10, poll_s=0.01).moves_pending == 0
    assert [loc.tier for loc in core.get("", keys)] == ["gpu"] * 3


def test_moves_between_the_gpu_tier_and_host_memory_copy_whole_runs():
    """Blocks back to back in both the arena and host memory cross in one copy; the
    others one by one, each to its own place."""
    gpu = GpuTier(8 * NBYTES, device="cpu")
    host = memoryview(bytearray(8 * NBYTES))
    slots = [Slot(i * NBYTES, NBYTES) for i in (0, 1, 2, 5, 6)]
    outs = [host[i * NBYTES : (i + 1) * NBYTES] for i in (3, 4, 5, 0, 7)]
    assert [(off, t.numel()) for off, t in host_runs(slots, outs)] == [
        (0, 3 * NBYTES), (5 * NBYTES, NBYTES), (6 * NBYTES, NBYTES)]
    data = [_payload(i) for i in range(5)]
    gpu.write_many(slots, [memoryview(d) for d in data], [None] * 5)
    gpu.read_many_into(slots, outs)
    assert [bytes(o) for o in outs] == data
    assert [bytes(gpu.span(s).numpy()) for s in slots] == data
    with pytest.raises(ValueError, match="host buffer of 8 bytes for a block of 4096"):
        list(host_runs([slots[0]], [host[:8]]))
