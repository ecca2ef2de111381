"""The Redis registry against a real redis-server: registration, heartbeat TTL, KV
events into the gateway's index, and Redis going away and coming back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from gateway.cluster_view import ClusterView
from gateway.kv_index import KVIndex, prompt_hashes
from services.common.launcher import RedisProcess, free_port, start_redis
from services.common.registry import (
    REDIS_UP,
    Keys,
    KVEventBuffer,
    Member,
    Registrar,
    read_members,
)
from services.engine.block_hash import HashContext
from services.engine.block_manager import BlockManager
from services.engine.sequence import SamplingParams, Sequence

NS = "t"


def wait_for(cond: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    rp = start_redis(free_port())
    yield rp
    rp.stop()


@pytest.fixture()
def client(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_proc.url)
    c.flushall()
    yield c
    c.close()


def registrar(url: str, role: str = "prefill", port: int = 1, ttl_s: float = 1.0,
              events: KVEventBuffer | None = None, **kw) -> Registrar:
    member = Member(role, f"127.0.0.1:{port}", "m", 8000 + port, 256, 32)
    return Registrar(url, member, lambda: {"running": 2, "waiting": 1}, ttl_s=ttl_s,
                     heartbeat_s=0.1, namespace=NS, kv_events=events, **kw)


def test_member_registers_beats_and_leaves(redis_proc: RedisProcess,
                                           client: redis.Redis) -> None:
    reg = registrar(redis_proc.url).start()
    wait_for(lambda: "prefill/127.0.0.1:1" in read_members(client, Keys(NS)))
    m = read_members(client, Keys(NS))["prefill/127.0.0.1:1"]
    assert (m.role, m.model, m.kv_blocks, m.max_seqs, m.http_port) == ("prefill", "m", 256, 32,
                                                                         8001)
    assert m.load == {"running": 2, "waiting": 1}
    assert 0 < client.pttl(Keys(NS).member(m.id)) <= 1000
    reg.stop()  # a clean stop leaves at once
    assert read_members(client, Keys(NS)) == {}


def test_silent_member_expires_within_ttl(redis_proc: RedisProcess,
                                          client: redis.Redis) -> None:
    reg = registrar(redis_proc.url, ttl_s=0.5).start()
    wait_for(lambda: read_members(client, Keys(NS)))
    reg._stop.set()  # the process hangs or dies: no more heartbeats, no goodbye
    reg._thread.join()
    t0 = time.monotonic()
    wait_for(lambda: not read_members(client, Keys(NS)), timeout_s=2.0)
    assert time.monotonic() - t0 < 0.6


def test_block_manager_names_and_forgets_blocks() -> None:
    events = KVEventBuffer()
    ctx = HashContext("m", 4, "float32")
    bm = BlockManager(3, 4, ctx)
    bm.on_kv_event = events.add
    seq = Sequence("a", list(range(9)), SamplingParams())
    bm.allocate(seq, 9)
    seq.num_computed_tokens = 8
    bm.commit(seq)
    hashes = prompt_hashes(range(9), "m", 4, "float32")
    assert events.drain() == [(hashes[0], True), (hashes[1], True)]
    bm.deallocate(seq)
    other = Sequence("b", [50] * 8, SamplingParams())
    bm.allocate(other, 8)  # the unnamed block, then the least recently freed named one
    assert [stored for _, stored in events.drain()] == [False]


def test_kv_events_reach_the_gateway_index(redis_proc: RedisProcess,
                                           client: redis.Redis) -> None:
    events = KVEventBuffer()
    reg = registrar(redis_proc.url, events=events).start()
    index = KVIndex()
    seen: list[dict[str, Member]] = []
    view = ClusterView(redis_proc.url, NS, index, seen.append, poll_s=0.1).start()
    try:
        wait_for(lambda: seen and "prefill/127.0.0.1:1" in seen[-1])
        hs = prompt_hashes(range(64), "m", 16, "float32")
        for h in hs:
            events.add(h, True)
        wid = "prefill/127.0.0.1:1"
        wait_for(lambda: index.prefix_blocks(wid, hs) == 4)
        events.add(hs[2], False)
        wait_for(lambda: index.prefix_blocks(wid, hs) == 2)
        assert client.scard(Keys(NS).kvset(wid)) == 3
        reg.stop()
        wait_for(lambda: not seen[-1] and not index.workers())
    finally:
        view.stop()


def test_redis_restart_rebuilds_the_registry(client: redis.Redis) -> None:
    port = free_port()
    rp = start_redis(port)
    events = KVEventBuffer()
    links: list[tuple[bool, str]] = []
    # a TTL that a loaded machine's late heartbeats cannot outlast: this test is about
    # Redis going away, not about a member expiring
    reg = registrar(rp.url, ttl_s=5.0, events=events,
                    on_change=lambda up, why: links.append((up, why)))
    reg.start()
    index = KVIndex()
    seen: list[dict[str, Member]] = []
    view = ClusterView(rp.url, NS, index, seen.append, poll_s=0.1).start()
    wid = "prefill/127.0.0.1:1"
    hs = prompt_hashes(range(48), "m", 16, "float32")
    try:
        for h in hs[:2]:
            events.add(h, True)
        wait_for(lambda: index.prefix_blocks(wid, hs) == 2)
        # a member writes its KV set before its key: the view lists it a moment later
        wait_for(lambda: seen and wid in seen[-1])
        rp.stop()
        wait_for(lambda: links and links[-1][0] is False)
        assert "unreachable" in links[-1][1] and REDIS_UP._value.get() == 0
        assert seen[-1] and index.prefix_blocks(wid, hs) == 2  # the last view is kept
        rp = start_redis(port)  # empty: the members write everything again
        wait_for(lambda: links[-1][0] is True)
        fresh = redis.Redis.from_url(rp.url)
        wait_for(lambda: wid in read_members(fresh, Keys(NS)))
        assert fresh.scard(Keys(NS).kvset(wid)) == 2
        fresh.close()
        events.add(hs[2], True)  # events flow again
        wait_for(lambda: index.prefix_blocks(wid, hs) == 3)
        view2 = ClusterView(rp.url, NS, KVIndex(), lambda m: None).start()
        try:  # a gateway starting now reads the rebuilt set
            wait_for(lambda: view2.index.prefix_blocks(wid, hs) == 3)
        finally:
            view2.stop()
    finally:
        view.stop()
        reg.stop()
        rp.stop()
