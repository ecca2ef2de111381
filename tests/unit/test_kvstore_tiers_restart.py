"""A real ``splitserve serve kvstore`` process with a cpu and a disk tier: restarted, its
disk blocks come back with the same bytes; a corrupted block file is a miss, counted;
killed with SIGKILL in the middle of disk writes, it serves nothing torn afterwards."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings, TransferSettings
from services.transfer import MissingBlocksError
from services.transfer.store_client import KVStoreClient

BLOCK = 64 << 10


def payload(k: bytes) -> bytes:
    seed = hashlib.sha256(k).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


def keys(prefix: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{prefix}{i}".encode(), digest_size=16).digest()
            for i in range(n)]


def settings_for(tmp: Path) -> tuple[ClusterSettings, Path]:
    s = with_free_ports(ClusterSettings())
    s.kvstore.tiers = [{"kind": "cpu", "bytes": 8 * BLOCK},
                       {"kind": "disk", "bytes": "64MiB", "path": str(tmp / "kv")}]
    s.kvstore.demote_high = s.kvstore.demote_low = 1.0  # demote on demand only: exact counts
    config = tmp / "cluster.yaml"
    s.dump_yaml(config)
    return s, config


def start(s: ClusterSettings, config: Path, tmp: Path) -> LocalCluster:
    return LocalCluster(s, config, log_dir=tmp, roles=("kvstore",)).start()


def client(s: ClusterSettings, transport: str = "grpc") -> KVStoreClient:
    return KVStoreClient(s.kvstore.address, TransferSettings(transport=transport))


def put_each(c: KVStoreClient, ks: list[bytes]) -> None:
    for k in ks:
        c.put("", [k], [payload(k)], BLOCK)


def tier_stats(c: KVStoreClient) -> dict:
    return {t.tier: t for t in c.stats().tiers}


def test_disk_blocks_survive_a_restart_and_a_corrupt_file_is_a_miss(tmp_path):
    s, config = settings_for(tmp_path)
    ks = keys("restart", 24)
    cluster = start(s, config, tmp_path)
    try:
        with client(s) as c:
            put_each(c, ks)
            per_tier = tier_stats(c)
            assert per_tier["disk"].blocks == 16 and per_tier["cpu"].demotions == 16
    finally:
        cluster.stop()
    files = list((tmp_path / "kv").glob("*.kv"))
    assert len(files) == 16
    bad = ks[5]
    victim = next(f for f in files if bad in f.read_bytes()[:128])  # the key is in the header
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x55  # the payload's last byte
    victim.write_bytes(bytes(raw))
    cluster = start(s, config, tmp_path)
    try:
        with client(s) as c:
            assert c.lookup_per_tier(ks) == {"cpu": 0, "disk": 16}
            got = c.get_prefix("r", ks)  # from disk; the corrupt block ends the prefix
            assert [bytes(g) for g in got] == [payload(k) for k in ks[:5]]
            c.release("r")
            assert tier_stats(c)["disk"].checksum_failures >= 1  # each failed read counts
            with pytest.raises(MissingBlocksError):
                c.get("", [bad])
        with client(s, "shm") as c:  # raised into the arena before it is read
            assert all(bytes(c.get("", [k])[0]) == payload(k) for k in ks[:16] if k != bad)
            assert c.stats().pins == 0 and tier_stats(c)["cpu"].promotions >= 8
    finally:
        cluster.stop()


def test_a_store_killed_mid_write_serves_nothing_torn(tmp_path):
    s, config = settings_for(tmp_path)
    cluster = start(s, config, tmp_path)
    stop = threading.Event()
    written: list[bytes] = []

    def writer() -> None:
        with client(s, "shm") as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                k = keys("kill", i + 1)[-1]
                try:
                    c.put("", [k], [payload(k)], BLOCK)
                except Exception:  # noqa: BLE001 (the store dies under it)
                    return
                written.append(k)

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 20
    while len(written) < 60 and time.monotonic() < deadline:  # demoting by now
        time.sleep(0.01)
    cluster.kill("kvstore")
    stop.set()
    t.join(10)
    assert len(written) >= 60
    os.sync()
    planted = tmp_path / "kv" / ".tmp-00000000000fffff.kv"
    planted.write_bytes(b"SSKVBLK1 torn")
    torn = tmp_path / "kv" / "00000000000ffffe.kv"
    torn.write_bytes(next((tmp_path / "kv").glob("*.kv")).read_bytes()[:-100])
    cluster = start(s, config, tmp_path)
    try:
        with client(s) as c:
            held = [k for k in written if c.lookup([k])]
            assert len(held) >= 40  # what reached the disk is found again
            for k in held:
                assert bytes(c.get("", [k])[0]) == payload(k)
            assert not planted.exists() and not torn.exists()  # deleted at start-up
            assert tier_stats(c)["disk"].checksum_failures == 1  # the truncated file
    finally:
        cluster.stop()
