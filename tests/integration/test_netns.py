"""The data plane across two hosts on one machine: the KV store in a network namespace,
this process in the root namespace, a veth pair between (bench/netns.py).

The store's UCX is held to TCP (UCX_TLS=tcp), so the bytes ride the veth link that the
tests shape and take down.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from bench.netns import NetnsPair, StoreInNetns, netns_pair, unavailable
from services.common.settings import ClusterSettings, TransferSettings
from services.transfer import ShmUnavailable, ucx_loop
from services.transfer.store_client import KVStoreClient

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
UCX = ucx_loop.unavailable() is None
MiB = 1 << 20
LATE = False  # this process started UCX before the veth existed: ucx cannot reach it


def next_rung() -> str:
    """What auto takes when shm is out of reach."""
    return "ucx" if UCX and not LATE else "grpc"


def store_settings() -> ClusterSettings:
    s = ClusterSettings()
    s.kvstore.cpu_bytes = 96 * MiB
    s.kvstore.pin_ttl_s = 5.0  # a get whose answer the dropped link lost: pins expire
    return s


@pytest.fixture(scope="module")
def pair() -> NetnsPair:
    global LATE
    LATE = ucx_loop.context_started()
    with netns_pair() as p:
        yield p


@pytest.fixture
def store(pair: NetnsPair, tmp_path: Path) -> StoreInNetns:
    with StoreInNetns(pair, store_settings(), tmp_path, env={"UCX_TLS": "tcp"}) as s:
        yield s


def data(n: int, size: int) -> tuple[list[bytes], list[bytes]]:
    return [os.urandom(16) for _ in range(n)], [os.urandom(size) for _ in range(n)]


def test_auto_takes_the_next_rung_across_namespaces_never_shm(store: StoreInNetns):
    with KVStoreClient(store.address) as c:
        d = c.describe()
        assert d.shm_name  # the store has an arena, and /dev/shm is even shared here...
        assert c.transport_name == next_rung()  # ...but another namespace is another host
        ks, blocks = data(16, 64 * 1024)
        assert c.put("o", ks, blocks) == (16, 0)
        assert [bytes(b) for b in c.get("o", ks)] == blocks
        c.release("o")
        assert c.stats().pinned_blocks == 0
    with KVStoreClient(store.address, TransferSettings(transport="shm")) as c, \
            pytest.raises(ShmUnavailable, match="another host or network namespace"):
        c.transport  # noqa: B018


@pytest.mark.skipif(not UCX, reason="ucxx is not installed (pip install 'splitserve[ucx]')")
def test_link_down_mid_transfer_retries_once_a_rung_down(store: StoreInNetns):
    """24 MiB at 100 Mbit/s takes ~2 s; the link goes down 0.5 s in, for 2.5 s. The ucx
    put stalls past its deadline, its endpoint is dropped and its slots aborted, and the
    put runs once more over grpc, which reconnects once the link is back."""
    if LATE:
        pytest.skip("this process started UCX before the veth existed (UCX lists the "
                    "interfaces once); run this module first or alone")
    pair = store.pair
    ks, blocks = data(24, MiB)
    client = KVStoreClient(store.address, TransferSettings(fallback_cooldown_s=60.0),
                           transfer_timeout_s=4.0)
    flap = threading.Thread(target=_flap, args=(pair, 0.5, 2.5))
    try:
        assert client.transport_name == "ucx"
        pair.shape("100mbit")
        flap.start()
        assert client.put("req-1", ks, blocks) == (24, 0)
        assert client.transport_name == "grpc"  # the retry, a rung down
        pair.shape(None)
        assert [bytes(b) for b in client.get("req-1", ks)] == blocks
        assert client.stats().pinned_blocks == 24  # the owner's, each block once
        client.release("req-1")
        assert client.stats().pinned_blocks == 0
    finally:
        flap.join()
        pair.link(True)
        pair.shape(None)
        client.close()


def _flap(pair: NetnsPair, after_s: float, down_s: float) -> None:
    time.sleep(after_s)
    pair.link(False)
    time.sleep(down_s)
    pair.link(True)


def test_link_down_gives_a_clean_error_and_no_pins(store: StoreInNetns):
    """The link stays down: the request fails within its deadlines with UNAVAILABLE or
    DEADLINE_EXCEEDED, and once the link is back nothing of it is pinned."""
    ks, blocks = data(4, 256 * 1024)
    client = KVStoreClient(store.address, timeout_s=3.0, transfer_timeout_s=3.0)
    try:
        assert client.put("req-2", ks, blocks) == (4, 0)
        client.release("req-2")
        store.pair.link(False)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.get("", ks)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - t0 < 20
    finally:
        store.pair.link(True)
    try:
        deadline = time.monotonic() + 20  # past the pin TTL of a get the link cut off
        while time.monotonic() < deadline:  # gRPC reconnects (with backoff), then the
            with contextlib.suppress(grpc.RpcError):  # pins of a get that got there go
                if client.stats().pinned_blocks == 0:
                    break
            time.sleep(0.5)
        assert client.stats().pinned_blocks == 0
        assert [bytes(b) for b in client.get("", ks)] == blocks
    finally:
        client.close()


def test_a_store_restarted_in_its_namespace_is_reconnected(store: StoreInNetns):
    ks, blocks = data(3, 4096)
    with KVStoreClient(store.address) as c:
        assert c.put("", ks, blocks) == (3, 0)
        first = c.describe().store_id
        store.stop()
        store.start()
        assert c.put("", ks, blocks) == (3, 0)  # a new, empty store
        assert [bytes(b) for b in c.get("", ks)] == blocks
        assert c.describe(refresh=True).store_id != first
        assert c.transport_name == next_rung()  # reconnected, not stepped down
        assert getattr(c.transport, "store_id", c.describe().store_id) == \
            c.describe().store_id
