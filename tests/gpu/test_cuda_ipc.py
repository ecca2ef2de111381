"""The gpu tier and the cuda_ipc transport between separate processes (a store process
and this one): bytes and checksums both ways, readers of each kind, corruption."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from services.common.settings import TransferSettings
from services.transfer import (
    InvalidRequestError,
    MissingBlocksError,
    cuda_ipc_transport,
    device_copy,
    put_pipeline,
)
from services.transfer.store_client import KVStoreClient
from tests.integration.test_transfer import start_store

MiB = 1 << 20
NBYTES = 64 * 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    settings, cluster = start_store(
        tmp_path_factory.mktemp("gpu-store"),
        tiers=[{"kind": "gpu", "bytes": 64 * MiB, "device": "cuda:0"},
               {"kind": "cpu", "bytes": 64 * MiB}])
    yield settings
    cluster.stop()


def _client(store, transport: str) -> KVStoreClient:
    c = KVStoreClient(store.kvstore.address, TransferSettings(transport=transport))
    assert c.transport_name == transport
    return c


def _keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def _rows(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, NBYTES), dtype=torch.uint8, device="cuda")


def test_device_blocks_round_trip_between_processes(store):
    with _client(store, "cuda_ipc") as c:
        keys, rows = _keys(8), _rows(8)
        assert c.put("w", keys, list(rows.unbind(0)), NBYTES).stored == 8
        assert c.lookup_per_tier(keys)["gpu"] == 8
        got = c.get("r", keys)
        assert all(g.is_cuda for g in got)
        assert torch.equal(torch.stack(got), rows)
        assert c.get_prefix("p", keys[:3] + _keys(1)) and len(c.get_prefix("q", keys)) == 8
        for owner in ("w", "r", "p", "q"):
            c.release(owner)
        assert c.stats().pins == 0


def test_host_readers_and_writers_meet_device_ones(store):
    with _client(store, "cuda_ipc") as dev, _client(store, "shm") as host:
        keys, rows = _keys(4), _rows(4)
        dev.put("", keys, list(rows.unbind(0)), NBYTES)
        got = host.get("", keys)  # moved to the cpu tier for the host reader
        assert [bytes(g) for g in got] == [bytes(r.cpu().numpy()) for r in rows]
        more = [os.urandom(NBYTES) for _ in range(3)]
        mkeys = _keys(3)
        host.put("", mkeys, more, NBYTES)  # lands in the cpu tier
        back = dev.get("", mkeys)  # read from the cpu arena, to this GPU
        assert [bytes(b.cpu().numpy()) for b in back] == more
        assert dev.stats().checksum_failures == 0


def test_a_corrupted_device_block_is_never_served(store):
    with _client(store, "cuda_ipc") as c:
        keys, rows = _keys(3), _rows(3)
        c.put("", keys, list(rows.unbind(0)), NBYTES)
        before = c.stats().checksum_failures
        arena = c.transport._arena
        owner = f"peek-{uuid.uuid4().hex}"
        offsets = _offsets(c, owner, keys)
        arena[offsets[1] + 5] ^= 0xFF  # behind the store's back
        torch.cuda.synchronize()
        c.release(owner)
        with pytest.raises(MissingBlocksError):
            c.get("", keys)
        assert len(c.get_prefix("", keys)) == 1  # the prefix ends before it
        s = c.stats()
        assert s.checksum_failures == before + 1 and s.pins == 0


def _device_get(c: KVStoreClient, owner: str, keys: list[bytes]):
    """The store's packed answer to a device reader's Get (pins for ``owner``)."""
    from splitserve.v1 import kvstore_pb2

    return c._stub.Get(kvstore_pb2.GetRequest(owner=owner, keys=keys, packed=True,
                                              device=True))


def _offsets(c: KVStoreClient, owner: str, keys: list[bytes]) -> list[int]:
    resp = _device_get(c, owner, keys)
    assert all(resp.on_device)
    return list(resp.offsets)


@pytest.fixture
def small_store(tmp_path):
    """A gpu tier of 16 blocks before a cpu tier of 128."""
    settings, cluster = start_store(
        tmp_path, tiers=[{"kind": "gpu", "bytes": 16 * NBYTES, "device": "cuda:0"},
                         {"kind": "cpu", "bytes": 128 * NBYTES}])
    yield settings
    cluster.stop()


def _device_sums(c: KVStoreClient, keys: list[bytes]) -> tuple[list[bool], list[bool]]:
    resp = _device_get(c, "", keys)
    return list(resp.on_device), list(resp.device_sums)


def test_a_gpu_tier_full_of_pinned_blocks_spills_device_puts_to_the_cpu_tier(small_store):
    with _client(small_store, "cuda_ipc") as c:
        held, rows = _keys(16), _rows(16)
        assert c.put("hold", held, list(rows.unbind(0)), NBYTES).stored == 16
        keys, more = _keys(4), _rows(4)
        assert c.put("w", keys, list(more.unbind(0)), NBYTES).stored == 4
        assert c.lookup_per_tier(keys)["cpu"] == 4
        assert _device_sums(c, keys) == ([False] * 4, [True] * 4)
        assert torch.equal(torch.stack(c.get("r", keys)), more)
        with _client(small_store, "shm") as host:  # the store's crc32s, verified there
            assert [bytes(b) for b in host.get("h", keys)] == \
                [bytes(r.cpu().numpy()) for r in more]
        for owner in ("hold", "w", "r", "h"):
            c.release(owner)
        s = c.stats()
        assert s.pins == 0 and s.checksum_failures == 0 and s.puts_refused == 0


def test_after_a_spill_a_large_put_goes_in_pipelined_chunks(small_store, monkeypatch):
    monkeypatch.setattr(put_pipeline, "CHUNK_BYTES", 2 * NBYTES)  # chunks of ~2 blocks
    seen: list[list[range]] = []

    def pipelined(stub, helpers, pieces, *rest, **named):
        seen.append(list(pieces))
        return put_pipeline.pipelined_put(stub, helpers, pieces, *rest, **named)

    monkeypatch.setattr(cuda_ipc_transport, "pipelined_put", pipelined)
    tokens: list[int] = []

    def write_token(host, offset, token, device):
        tokens.append(token)
        return device_copy.write_token(host, offset, token, device)

    monkeypatch.setattr(cuda_ipc_transport, "write_token", write_token)
    with _client(small_store, "cuda_ipc") as c, _client(small_store, "shm") as host:
        c.put("hold", _keys(16), list(_rows(16).unbind(0)), NBYTES)
        c.put("w", _keys(1), list(_rows(1).unbind(0)), NBYTES)  # spilled: chunks from now
        assert len(tokens) == 1  # committed as it landed (the store had a pad for it)
        keys, rows = _keys(6), _rows(6)
        assert c.put("w", keys, list(rows.unbind(0)), NBYTES).stored == 6
        assert seen[-1] == [range(0, 2), range(2, 5), range(5, 6)]
        assert len(tokens) == 4 and len(set(tokens)) == 4
        assert c.lookup_per_tier(keys)["cpu"] == 6
        assert torch.equal(torch.stack(c.get("r", keys)), rows)
        assert [bytes(b) for b in host.get("h", keys)] == [bytes(r.cpu().numpy()) for r in rows]
        for owner in ("hold", "w", "r", "h"):
            c.release(owner)
        s = c.stats()
        assert s.pins == 0 and s.checksum_failures == 0 and s.puts_refused == 0


def test_demoted_blocks_are_read_to_the_gpu_and_verified_there(small_store):
    with _client(small_store, "cuda_ipc") as c:
        cold, rows = _keys(8), _rows(8)
        c.put("", cold, list(rows.unbind(0)), NBYTES)
        c.put("hold", _keys(16), list(_rows(16).unbind(0)), NBYTES)  # pushes them down
        assert c.lookup_per_tier(cold)["cpu"] == 8
        assert _device_sums(c, cold) == ([False] * 8, [True] * 8)
        assert torch.equal(torch.stack(c.get("r", cold)), rows)
        c.release("r")
        owner = f"peek-{uuid.uuid4().hex}"
        offsets = list(_device_get(c, owner, cold[3:4]).offsets)
        c.transport._host_arena()[offsets[0] + 9] ^= 0x10  # behind the store's back
        c.release(owner)
        before = c.stats().checksum_failures
        with pytest.raises(MissingBlocksError):
            c.get("", cold)
        assert len(c.get_prefix("p", cold)) == 3
        c.release("p")
        c.release("hold")
        s = c.stats()
        assert s.checksum_failures == before + 1 and s.pins == 0



def test_a_get_lands_in_place_from_every_tier_and_path(small_store):
    """Blocks of the gpu tier, demoted ones (dsum32) and host-written ones (crc32), read
    into one preallocated device buffer: each lands in its own row, in place."""
    with _client(small_store, "cuda_ipc") as dev, _client(small_store, "shm") as host:
        demoted, drows = _keys(4), _rows(4)
        dev.put("", demoted, list(drows.unbind(0)), NBYTES)
        hot, hrows = _keys(16), _rows(16)
        dev.put("hold", hot, list(hrows.unbind(0)), NBYTES)  # pushes the first ones down
        written = _keys(3)
        wrows = [os.urandom(NBYTES) for _ in range(3)]
        host.put("", written, wrows, NBYTES)
        keys = written[:1] + demoted + hot[:2] + written[1:]
        want = torch.cat([torch.frombuffer(bytearray(wrows[0]), dtype=torch.uint8).cuda()[None],
                          drows, hrows[:2],
                          torch.stack([torch.frombuffer(bytearray(w), dtype=torch.uint8)
                                       for w in wrows[1:]]).cuda()])
        out = torch.zeros_like(want)
        rows = list(out.unbind(0))
        got = dev.get("r", keys, out=rows)
        assert all(g is r for g, r in zip(got, rows, strict=True))
        assert torch.equal(out, want)
        dev.release("r")
        dev.release("hold")
        assert dev.stats().pins == 0


def test_output_buffers_a_get_cannot_fill_are_refused(store):
    with _client(store, "cuda_ipc") as c:
        keys, rows = _keys(2), _rows(2)
        c.put("", keys, list(rows.unbind(0)), NBYTES)
        short = torch.zeros(2, NBYTES - 16, dtype=torch.uint8, device="cuda")
        with pytest.raises(InvalidRequestError, match="output buffer 0 has"):
            c.get("", keys, out=list(short.unbind(0)))
        strided = torch.zeros(NBYTES, 2, dtype=torch.uint8, device="cuda")
        with pytest.raises(InvalidRequestError, match="not contiguous"):
            c.get("", keys, out=[strided[:, 0], strided[:, 1]])
        assert not short.any() and not strided.any()
        assert c.stats().pins == 0
