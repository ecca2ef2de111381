"""The store over a cpu and a disk tier, in process: demotion, promotion, admission,
corruption, the index found again from the files, per-tier counts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvstore.store import KVStoreCore, NotFound, ResourceExhausted
from kvstore.tiers import build_tiers
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.disk import DiskTier
from services.common.settings import KVStoreSettings, SettingsError
from splitserve.v1 import common_pb2

BLOCK = 4096


def key(i: int) -> bytes:
    return f"key-{i}".encode().ljust(16, b".")


def payload(i: int) -> bytes:
    return (f"<{i}>".encode() * BLOCK)[:BLOCK]


def make(path: Path, cpu_blocks: int = 4, disk_blocks: int = 8, admit: str = "all",
         promote_on_get: bool = False):
    """A store whose grpc-like reads promote nothing, unless asked (no races)."""
    cpu = CpuTier(cpu_blocks * BLOCK)
    disk = DiskTier(disk_blocks * DiskTier.footprint(None, BLOCK), path, fsync=False,
                    admit=admit)
    return KVStoreCore([cpu, disk], promote_on_get=promote_on_get), cpu, disk


def put(core: KVStoreCore, ids, owner: str = "") -> None:
    """One put per block (a put must fit in the cpu tier as a whole)."""
    for i in ids:
        core.put(owner, [common_pb2.BlockRef(key=key(i), num_tokens=16)], [payload(i)], BLOCK)


def where(core: KVStoreCore, i: int) -> str | None:
    b = core._blocks.get(key(i))
    return None if b is None else b.tier.name


def read(core: KVStoreCore, i: int, owner: str = "r", memory: bool = False) -> bytes:
    (loc,) = core.get(owner, [key(i)], memory=memory)
    data = bytes(core.read(loc))
    core.release(owner)
    return data


def tier(core: KVStoreCore, name: str):
    return next(t for t in core.stats().tiers if t.name == name)


def test_a_full_cpu_tier_demotes_its_lru_blocks_to_disk(tmp_path):
    core, cpu, disk = make(tmp_path)
    put(core, range(4))
    read(core, 0)  # 0 is the most recently used now
    put(core, [4, 5])
    assert [where(core, i) for i in range(6)] == ["cpu", "disk", "disk", "cpu", "cpu", "cpu"]
    assert len(list(tmp_path.glob("*.kv"))) == 2
    s = core.stats()
    assert (tier(core, "cpu").demotions, s.demotions, s.evictions) == (2, 2, 0)
    assert cpu.used_bytes == 4 * BLOCK and disk.used_bytes == 2 * disk.footprint(BLOCK)
    assert read(core, 1) == payload(1)  # served from disk, same bytes


def test_the_last_tier_evicts_and_pinned_blocks_stay(tmp_path):
    core, _, _ = make(tmp_path, cpu_blocks=2, disk_blocks=2)
    put(core, [0], owner="reader")  # pinned: never demoted nor evicted under its reader
    put(core, range(1, 6))
    assert where(core, 0) == "cpu"
    assert sum(where(core, i) is not None for i in range(1, 6)) == 3  # 1 cpu + 2 disk
    assert tier(core, "disk").evictions == 2 and tier(core, "cpu").evictions == 0
    core.release("reader")


def test_a_get_of_a_disk_block_promotes_it(tmp_path):
    core, _, _ = make(tmp_path, promote_on_get=True)
    put(core, range(6))
    assert where(core, 0) == "disk"
    assert read(core, 0, memory=True) == payload(0)  # raised before its location is given
    assert where(core, 0) == "cpu"
    assert tier(core, "cpu").promotions == 1
    core.get("", [key(1)])  # a grpc read: promoted in the background
    deadline = time.monotonic() + 10
    while where(core, 1) != "cpu" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert where(core, 1) == "cpu"
    assert core.promote([key(1), key(99)]) == (0, 1, 1, 0)


def test_a_shm_get_that_cannot_raise_its_block_says_so(tmp_path):
    core, _, _ = make(tmp_path, cpu_blocks=2)
    put(core, range(4))
    put(core, [10, 11], owner="holder")  # the cpu tier is all pinned now
    assert where(core, 0) == "disk"
    with pytest.raises(ResourceExhausted, match="transport: grpc"):
        core.get("r", [key(0)], memory=True)
    assert core.get("r", [key(0)], prefix=True, memory=True) == []
    assert core.stats().pins == 2  # the failed gets pinned nothing
    assert read(core, 0) == payload(0)  # the grpc path reads it from disk


def test_admission_seen_only_takes_blocks_asked_before(tmp_path):
    core, _, _ = make(tmp_path, admit="seen")
    put(core, range(4))
    core.lookup([key(1)])
    put(core, range(4, 8))
    assert [where(core, i) for i in range(4)] == [None, "disk", None, None]
    assert tier(core, "cpu").evictions == 3 and tier(core, "cpu").demotions == 1


def test_a_corrupt_block_file_is_a_miss_and_counted(tmp_path):
    core, _, _ = make(tmp_path)
    put(core, range(6))
    (f,) = [p for p in tmp_path.glob("*.kv") if key(0) in p.read_bytes()]
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(NotFound):
        core.get("r", [key(0)], memory=True)
    assert where(core, 0) is None and tier(core, "disk").checksum_failures == 1
    assert core.stats().pins == 0
    loc = core.get("r", [key(1)])[0]  # the grpc path: the server checks, drops, counts
    f1 = next(p for p in tmp_path.glob("*.kv") if key(1) in p.read_bytes())
    f1.write_bytes(f1.read_bytes()[:-1] + b"?")
    assert not core.check(loc)
    assert tier(core, "disk").checksum_failures == 2


def test_the_index_is_found_again_from_the_files(tmp_path):
    core, _, _ = make(tmp_path)
    put(core, range(6))
    on_disk = [i for i in range(6) if where(core, i) == "disk"]
    core.close()
    (tmp_path / ".tmp-00000000000000ff.kv").write_bytes(b"torn")  # a write cut short
    (tmp_path / "00000000000000fe.kv").write_bytes(b"SSKVBLK1 garbage")
    again, _, disk = make(tmp_path)
    assert sorted(i for i in range(6) if where(again, i) == "disk") == on_disk
    assert all(read(again, i) == payload(i) for i in on_disk)
    assert not (tmp_path / ".tmp-00000000000000ff.kv").exists()
    assert tier(again, "disk").checksum_failures == 1  # the bad header, not the temp file
    assert disk.used_bytes == len(on_disk) * disk.footprint(BLOCK)
    put(again, [50])  # new files never reuse an old name
    assert len(list(tmp_path.glob("*.kv"))) == len(on_disk)


def test_per_tier_counts_after_a_script(tmp_path):
    core, _, _ = make(tmp_path)
    put(core, range(6))  # 0, 1 demoted
    read(core, 2)  # cpu hit
    read(core, 0, memory=True)  # disk hit, cpu miss, promoted (demotes 3)
    with pytest.raises(NotFound):
        core.get("r", [key(77)])  # a miss of every tier
    cpu, disk = tier(core, "cpu"), tier(core, "disk")
    assert (cpu.hits, cpu.misses, cpu.promotions, cpu.demotions) == (1, 2, 1, 3)
    assert (disk.hits, disk.misses, disk.evictions, disk.blocks) == (1, 1, 0, 2)
    assert (cpu.blocks, core.stats().blocks) == (4, 6)


def test_tiers_from_settings(tmp_path):
    ks = KVStoreSettings(tiers=[{"kind": "cpu", "bytes": "1MiB", "shm": False},
                                {"kind": "disk", "bytes": "2 GiB", "path": str(tmp_path)}])
    tiers = build_tiers(ks.tier_specs(), "unit")
    assert [(t.name, t.capacity_bytes) for t in tiers] == [("cpu", 1 << 20),
                                                           ("disk", 2 << 30)]
    for t in tiers:
        t.close()
    assert KVStoreSettings(cpu_bytes=4096, shm=False).tier_specs() == [
        {"kind": "cpu", "bytes": 4096, "shm": False}]
    with pytest.raises(ValueError, match=r"tiers\[1\]\.path"):
        build_tiers([{"kind": "cpu", "bytes": 4096, "shm": False},
                     {"kind": "disk", "bytes": 4096}], "unit")
    with pytest.raises(ValueError, match=r"tiers\[0\]\.kind: unknown tier kind 'tape'"):
        build_tiers([{"kind": "tape", "bytes": 1}], "unit")
    with pytest.raises(SettingsError, match=r"tiers\[0\]\.bytes"):
        KVStoreSettings(tiers=[{"kind": "cpu", "bytes": "lots"}])
    assert os.listdir(tmp_path) == ["LOCK"]
    DiskTier(4096, tmp_path).close()  # the lock went with close
    with pytest.raises(ValueError, match="another KV store uses"):
        a = DiskTier(4096, tmp_path)
        DiskTier(4096, tmp_path)
    a.close()


def test_watermarks_demote_in_the_background_before_the_tier_is_full(tmp_path):
    """Past the high mark (7 of 8 blocks), the coldest blocks go down to disk on the
    demoter's thread until the cpu tier is at the low mark (4 of 8); pinned blocks
    stay; every block still reads back its bytes."""
    core, cpu, disk = make(tmp_path, cpu_blocks=8, disk_blocks=16)
    core.set_watermarks(high=0.8, low=0.5)
    core.put("pinner", [common_pb2.BlockRef(key=key(0), num_tokens=16)], [payload(0)], BLOCK)
    put(core, range(1, 6))
    assert cpu.free_bytes == 2 * BLOCK and tier(core, "cpu").demotions == 0  # 6 of 8: below
    put(core, [6, 7])  # 8 of 8: past the high mark; the puts themselves did not demote
    deadline = time.monotonic() + 10
    while cpu.capacity_bytes - cpu.free_bytes > 4 * BLOCK:
        assert time.monotonic() < deadline, "the demoter did not bring the tier down"
        time.sleep(0.01)
    assert where(core, 0) == "cpu"  # pinned: never demoted
    assert [where(core, i) for i in (1, 2, 3, 4)] == ["disk"] * 4  # the coldest went
    assert [where(core, i) for i in (5, 6, 7)] == ["cpu"] * 3
    assert all(read(core, i) == payload(i) for i in range(8))


def test_watermarks_must_be_ordered():
    with pytest.raises(SettingsError, match="demote_low <= demote_high"):
        KVStoreSettings(demote_high=0.5, demote_low=0.8)
