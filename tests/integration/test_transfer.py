"""The KV store process and the data plane, over real gRPC on loopback.

One store process serves the module; every check runs once per available transport.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings, TransferSettings
from services.transfer import InvalidRequestError, MissingBlocksError, StoreFullError
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

MiB = 1 << 20
STORE_BYTES = 8 * MiB
TRANSPORTS = ["grpc", "shm", "ucx"]


def start_store(tmp: Path, **kv) -> tuple[ClusterSettings, LocalCluster]:
    settings = with_free_ports(ClusterSettings())
    settings.kvstore.cpu_bytes = STORE_BYTES
    settings.transfer.chunk_bytes = 64 * 1024  # small: blocks span several messages
    settings.transfer.ucx = kv.pop("ucx", True)
    for k, v in kv.items():
        setattr(settings.kvstore, k, v)
    config = tmp / "cluster.yaml"
    settings.dump_yaml(config)
    return settings, LocalCluster(settings, config, log_dir=tmp, roles=("kvstore",)).start()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    settings, cluster = start_store(tmp_path_factory.mktemp("kvstore"))
    yield settings
    cluster.stop()


@pytest.fixture(params=TRANSPORTS)
def client(request, store):
    c = KVStoreClient(store.kvstore.address,
                      TransferSettings(transport=request.param, chunk_bytes=64 * 1024))
    try:
        name = c.transport_name
    except OSError as e:
        c.close()
        pytest.skip(f"transport {request.param} unavailable here: {e}")
    assert name == request.param
    yield c
    c.close()


@pytest.fixture
def stub(store):
    with grpc.insecure_channel(store.kvstore.address) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def blocks(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def owner() -> str:
    return f"req-{os.urandom(6).hex()}"


def http_get(settings: ClusterSettings, path: str) -> tuple[int, str]:
    url = f"http://{settings.kvstore.host}:{settings.kvstore.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- the same checks over every transport -----------------------------------------------
@pytest.mark.parametrize("size", [4096, 200 * 1024])  # one message, several messages
def test_round_trip(client, size):
    ks, data, o = keys(5), blocks(5, size), owner()
    assert client.put(o, ks, data, size) == (5, 0)
    got = client.get(o, ks)
    assert [bytes(g) for g in got] == data
    outs = [np.zeros(size, dtype=np.uint8) for _ in ks]
    assert client.get(o, ks, out=outs) is not None
    assert [o_.tobytes() for o_ in outs] == data
    client.release(o)


def test_any_buffer_type_is_a_payload(client):
    import torch

    size = 8192
    raw = blocks(5, size)
    payloads = [raw[0], bytearray(raw[1]), memoryview(raw[2]),
                np.frombuffer(raw[3], dtype=np.float16).reshape(64, -1),
                torch.frombuffer(bytearray(raw[4]), dtype=torch.uint8)]
    ks, o = keys(5), owner()
    assert client.put(o, ks, payloads) == (5, 0)  # block_nbytes inferred
    assert [bytes(g) for g in client.get(o, ks)] == raw
    out = torch.zeros(5, size, dtype=torch.uint8)
    client.get(o, ks, out=[out[i] for i in range(5)])
    assert [bytes(out[i].numpy()) for i in range(5)] == raw
    client.release(o)


def test_lookup_after_put(client):
    ks, o = keys(4), owner()
    assert client.lookup(ks) == 0
    client.put(o, ks[:3], blocks(3, 1024), 1024)
    assert client.lookup(ks) == 3
    assert client.lookup(ks[1:]) == 2
    assert client.lookup_per_tier(ks) == {"cpu": 3}
    client.release(o)


def test_get_pins_and_release_unpins(client):
    ks = keys(3)
    client.put("", ks, blocks(3, 2048), 2048)
    before = client.stats()
    o = owner()
    client.get(o, ks)
    during = client.stats()
    assert during.pins - before.pins == 3
    assert during.pinned_blocks - before.pinned_blocks == 3
    assert during.owners - before.owners == 1
    assert during.hits - before.hits == 3
    assert client.release(o) == 3
    after = client.stats()
    assert (after.pins, after.pinned_blocks, after.owners) == (
        before.pins, before.pinned_blocks, before.owners)


def test_a_get_without_owner_pins_only_while_it_runs(client):
    ks = keys(2)
    client.put("", ks, blocks(2, 1024), 1024)
    before = client.stats().pins
    assert len(client.get("", ks)) == 2
    assert client.stats().pins == before


def test_a_missing_block_raises_not_found(client):
    ks, o = keys(3), owner()
    client.put(o, ks[:2], blocks(2, 1024), 1024)
    before = client.stats()
    with pytest.raises(MissingBlocksError) as e:
        client.get(o, ks)
    assert isinstance(e.value, KeyError)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "1 of 3 blocks not held" in e.value.details()
    after = client.stats()
    assert after.pins == before.pins  # nothing pinned by the failed get
    assert after.misses == before.misses + 1
    client.release(o)


def test_a_present_block_is_not_rewritten(client):
    ks, o = keys(3), owner()
    first = blocks(3, 1024)
    assert client.put(o, ks[:2], first[:2], 1024) == (2, 0)
    assert client.put(o, ks, [b"x" * 1024] * 3, 1024) == (1, 2)
    assert client.put(o, ks, [b"y" * 1024] * 3, 1024) == (0, 3)
    got = client.get(o, ks)
    assert [bytes(g) for g in got[:2]] == first[:2]
    assert bytes(got[2]) == b"x" * 1024
    client.release(o)


def test_private_tail_goes_with_release(client):
    o = owner()
    tail = common_pb2.BlockRef(key=os.urandom(16), num_tokens=5, partial=True)
    full = common_pb2.BlockRef(key=os.urandom(16), num_tokens=16)
    client.put(o, [full, tail], blocks(2, 1024), 1024)
    assert client.lookup([full.key, tail.key]) == 2
    client.release(o)
    assert client.lookup([full.key]) == 1
    assert client.lookup([tail.key]) == 0


def test_a_full_store_refuses_a_put(client):
    o, size = owner(), 1 * MiB
    pinned = keys(7)
    client.put(o, pinned, blocks(7, size), size)  # evicts what other tests left unpinned
    refused = client.stats().puts_refused
    with pytest.raises(StoreFullError) as e:
        client.put("", keys(2), blocks(2, size), size)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 2097152 bytes" in e.value.details()
    assert client.stats().puts_refused == refused + 1
    assert client.lookup(pinned) == 7  # pinned blocks survived
    client.release(o)
    assert client.put("", keys(2), blocks(2, size), size) == (2, 0)  # room again


def _flip_a_byte(client, stub, key: bytes) -> None:
    """Corrupts a stored block in the shared arena, behind the store's back."""
    shm_name = client.describe().shm_name
    loc = stub.Get(kvstore_pb2.GetRequest(owner="probe", keys=[key])).blocks[0]
    stub.Release(kvstore_pb2.ReleaseRequest(owner="probe"))
    with open(f"/dev/shm/{shm_name}", "r+b") as f:
        f.seek(loc.offset + 100)
        b = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_block_is_a_miss(client, stub, store):
    ks, data = keys(2), blocks(2, 4096)
    client.put("", ks, data, 4096)
    _flip_a_byte(client, stub, ks[0])
    failures = client.stats().checksum_failures
    with pytest.raises(MissingBlocksError, match="checksum"):
        client.get(owner(), ks)
    assert client.stats().checksum_failures == failures + 1
    assert client.lookup(ks) == 0
    assert bytes(client.get("", ks[1:])[0]) == data[1]


def test_get_prefix_pins_and_returns_the_held_prefix(client):
    ks, data = keys(5), blocks(5, 4096)
    client.put("", ks[:3], data[:3], 4096)  # held: 0, 1, 2 (unpinned)
    before = client.stats()
    o = owner()
    got = client.get_prefix(o, ks)  # partial: 3 of 5
    assert [bytes(g) for g in got] == data[:3]
    during = client.stats()
    assert during.pins - before.pins == 3  # only the returned blocks are pinned
    assert during.owners - before.owners == 1
    assert during.hits - before.hits == 3
    assert [bytes(g) for g in client.get_prefix(o, ks[:3])] == data[:3]  # full
    assert client.stats().pins - before.pins == 3  # the same pins again
    o2 = owner()
    assert client.get_prefix(o2, [ks[4], *ks[:3]]) == []  # none: the first is missing
    assert (client.stats().pins, client.stats().owners) == (during.pins, during.owners)
    outs = [np.zeros(4096, dtype=np.uint8) for _ in ks]
    filled = client.get_prefix(o, ks, out=outs)
    assert len(filled) == 3 and all(f is o_ for f, o_ in zip(filled, outs, strict=False))
    assert [o_.tobytes() for o_ in outs[:3]] == data[:3]
    assert client.release(o) == 3
    after = client.stats()
    assert (after.pins, after.pinned_blocks, after.owners) == (
        before.pins, before.pinned_blocks, before.owners)


def test_get_prefix_of_no_keys_makes_no_call():
    with KVStoreClient("127.0.0.1:9", TransferSettings(transport="grpc")) as c:
        assert c.get_prefix("o", []) == []  # nothing listens there: no call was made


def test_get_prefix_without_owner_pins_only_while_it_runs(client):
    ks = keys(3)
    client.put("", ks[:2], blocks(2, 1024), 1024)
    before = client.stats().pins
    assert len(client.get_prefix("", ks)) == 2
    assert client.stats().pins == before


@pytest.mark.parametrize("size", [4096, 100 * 1024])  # found before / after data went out
def test_a_corrupt_block_ends_the_prefix(client, stub, store, size):
    ks, data = keys(4), blocks(4, size)
    client.put("", ks, data, size)
    _flip_a_byte(client, stub, ks[2])
    before = client.stats()
    o = owner()
    got = client.get_prefix(o, ks)
    assert [bytes(g) for g in got] == data[:2]
    after = client.stats()
    assert after.checksum_failures == before.checksum_failures + 1
    assert after.pins - before.pins == 2  # none past the prefix
    assert client.lookup(ks) == 2  # the corrupt block was dropped
    assert client.release(o) == 2
    assert bytes(client.get("", ks[3:])[0]) == data[3]


def test_wrong_payload_sizes_are_refused(client):
    with pytest.raises(InvalidRequestError, match="block_nbytes=1024"):
        client.put("", keys(2), [b"a" * 1024, b"b" * 1000], 1024)
    with pytest.raises(InvalidRequestError, match="2 block refs but 1 payloads"):
        client.put("", keys(2), [b"a" * 1024], 1024)


def test_threads_share_one_client(client):
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                ks, data, o = keys(4), blocks(4, 16 * 1024), owner()
                client.put(o, ks, data, 16 * 1024)
                assert [bytes(g) for g in client.get(o, ks)] == data
                client.release(o)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_transfer_metrics_count_bytes(client, store):
    name = client.transport_name
    sample = {"transport": name, "direction": "put"}
    before = REGISTRY.get_sample_value("splitserve_kv_transfer_bytes_total", sample) or 0
    ks, o = keys(2), owner()
    client.put(o, ks, blocks(2, 4096), 4096)
    client.get(o, ks)
    client.release(o)
    assert REGISTRY.get_sample_value("splitserve_kv_transfer_bytes_total", sample) == (
        before + 8192)
    assert REGISTRY.get_sample_value("splitserve_kv_transfer_bytes_total",
                                     {"transport": name, "direction": "get"}) >= 8192
    code, text = http_get(store, "/metrics")
    assert code == 200
    assert f'splitserve_kvstore_transfer_bytes_total{{direction="put",transport="{name}"}}' in text
    for metric in ("splitserve_kvstore_blocks ", 'splitserve_kvstore_used_bytes{tier="cpu"}',
                   "splitserve_kvstore_hits_total", "splitserve_kvstore_evictions_total",
                   "splitserve_kvstore_rpc_seconds_bucket"):
        assert metric in text, metric


# -- the service itself -----------------------------------------------------------------
def test_health_and_http_probes(store):
    with grpc.insecure_channel(store.kvstore.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "splitserve.v1.KVStore"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert http_get(store, "/healthz")[0] == 200
    assert http_get(store, "/readyz") == (200, "ready\n")


def test_describe(stub):
    d = stub.Describe(kvstore_pb2.DescribeRequest())
    assert d.shm_name and d.shm_bytes > STORE_BYTES and list(d.tiers) == ["cpu"]
    assert os.path.exists(f"/dev/shm/{d.shm_name}")


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_malformed_requests_get_precise_statuses(stub):
    ref = common_pb2.BlockRef
    bad_keys = [b"", b"k" * 65]
    for k in bad_keys:
        code, msg = _code(lambda k=k: stub.BeginPut(kvstore_pb2.BeginPutRequest(
            blocks=[ref(key=k)], block_nbytes=64)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "1 to 64 bytes" in msg
        code, _ = _code(lambda k=k: stub.Lookup(kvstore_pb2.LookupRequest(keys=[k])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, _ = _code(lambda k=k: stub.Get(kvstore_pb2.GetRequest(owner="o", keys=[k])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = _code(lambda: stub.BeginPut(kvstore_pb2.BeginPutRequest(
        blocks=[ref(key=b"k" * 16)], block_nbytes=0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "block_nbytes" in msg
    code, msg = _code(lambda: stub.CommitPut(kvstore_pb2.CommitPutRequest(put_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "no pending put" in msg
    begun = stub.BeginPut(kvstore_pb2.BeginPutRequest(blocks=[ref(key=os.urandom(16))],
                                                      block_nbytes=64))
    code, msg = _code(lambda: stub.CommitPut(kvstore_pb2.CommitPutRequest(
        put_id=begun.put_id, checksums=[1, 2])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "checksums" in msg
    stub.CommitPut(kvstore_pb2.CommitPutRequest(put_id=begun.put_id, abort=True))
    code, msg = _code(lambda: stub.Release(kvstore_pb2.ReleaseRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "owner" in msg


def test_put_blocks_with_the_wrong_payload_length_is_refused(stub):
    k = os.urandom(16)

    def stream(data: bytes):
        yield kvstore_pb2.PutChunk(blocks=[common_pb2.BlockRef(key=k)], block_nbytes=100,
                                   data=data)

    for data, what in ((b"x" * 99, "payload is 99 bytes"), (b"x" * 101, "payload longer")):
        code, msg = _code(lambda data=data: stub.PutBlocks(stream(data)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and what in msg
    assert stub.Lookup(kvstore_pb2.LookupRequest(keys=[k])).num_blocks == 0
    # a generated client's message works like the fast codec's
    assert stub.PutBlocks(stream(b"y" * 100)).stored == 1
    k2 = os.urandom(16)
    stub.PutBlocks(iter([kvstore_pb2.PutChunk(blocks=[common_pb2.BlockRef(key=k2)],
                                              block_nbytes=50, data=b"z" * 50)]))
    chunks = list(stub.GetBlocks(kvstore_pb2.GetRequest(keys=[k, k2])))
    assert [(c.index, c.offset, c.length, list(c.lengths), c.data) for c in chunks] == [
        (0, 0, 100, [100, 50], b"y" * 100 + b"z" * 50)]  # packed: back to back


def test_sigterm_exits_zero_and_unlinks_the_arena(tmp_path):
    settings, cluster = start_store(tmp_path, cpu_bytes=MiB)
    try:
        with KVStoreClient(settings.kvstore.address) as c:
            name = c.describe().shm_name
            c.put("o", keys(1), [b"z" * 1024], 1024)
        assert os.path.exists(f"/dev/shm/{name}")
        proc = cluster.find("kvstore").proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        cluster.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_follows_a_restarted_store(tmp_path, transport):
    settings, cluster = start_store(tmp_path, cpu_bytes=MiB)
    client = KVStoreClient(settings.kvstore.address, TransferSettings(transport=transport))
    try:
        ks, data = keys(2), blocks(2, 4096)
        client.put("", ks, data, 4096)
        first = client.describe().store_id
        cluster.stop()
        cluster = LocalCluster(settings, cluster.config_path, log_dir=tmp_path,
                               roles=("kvstore",)).start()
        assert client.put("", ks, data, 4096) == (2, 0)  # a new, empty store
        assert [bytes(g) for g in client.get("", ks)] == data
        assert client.describe(refresh=True).store_id != first
        assert client.transport_name == transport
    finally:
        client.close()
        cluster.stop()


def test_auto_picks_shm_on_this_host(store):
    with KVStoreClient(store.kvstore.address) as c:  # TransferSettings() -> auto
        assert c.transport_name == "shm"


def test_auto_falls_back_to_grpc_without_an_arena(tmp_path):
    from services.transfer import ShmUnavailable

    settings, cluster = start_store(tmp_path, cpu_bytes=MiB, shm=False, ucx=False)
    try:
        with KVStoreClient(settings.kvstore.address) as c:
            assert c.describe().shm_name == ""
            assert c.describe().ucx_port == 0
            assert c.transport_name == "grpc"
            ks, data = keys(3), blocks(3, 1000)
            assert c.put("", ks, data) == (3, 0)
            assert [bytes(g) for g in c.get("", ks)] == data
        with KVStoreClient(settings.kvstore.address, TransferSettings(transport="shm")) as c, \
                pytest.raises(ShmUnavailable, match="forced"):
            c.transport_name  # noqa: B018
    finally:
        cluster.stop()
