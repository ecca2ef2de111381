"""Routing policies."""

from __future__ import annotations

import threading

import pytest

from gateway.router import (
    DECODE,
    KVAwareRouter,
    NoHealthyWorkerError,
    Router,
    RouteRequest,
    WorkerInfo,
    make_router,
)
from services.engine.block_hash import HashContext, block_hashes
from splitserve.v1 import worker_pb2


def workers(*ids: str, role: str = "prefill", model: str = "m") -> list[WorkerInfo]:
    return [
        WorkerInfo(worker_id=i, address=f"h:{n}", role=role, model=model) for n, i in enumerate(ids)
    ]


def rr(i: int, tokens: int = 0, **kw) -> RouteRequest:
    return RouteRequest(request_id=f"r{i}", model="m", num_tokens=tokens, **kw)


def test_make_router_names() -> None:
    for name in ("round_robin", "least_loaded", "kv_aware"):
        assert isinstance(make_router(name), Router) and make_router(name).name == name
    with pytest.raises(
        ValueError,
        match="unknown routing policy 'fastest'; known: kv_aware, least_loaded, round_robin",
    ):
        make_router("fastest")


def test_round_robin_cycles_in_id_order_and_skips_unhealthy() -> None:
    r = make_router("round_robin")
    ws = workers("c", "a", "b")
    assert [r.pick(ws, rr(i)).worker_id for i in range(4)] == ["a", "b", "c", "a"]
    ws[2].healthy = False  # "b"
    assert [r.pick(ws, rr(i)).worker_id for i in range(3)] == ["c", "a", "c"]


def test_round_robin_survives_membership_changes() -> None:
    r = make_router("round_robin")
    assert r.pick(workers("a", "b", "c"), rr(0)).worker_id == "a"
    assert r.pick(workers("a", "c"), rr(1)).worker_id == "c"  # the next after "a"
    assert r.pick(workers("a", "b"), rr(2)).worker_id == "a"  # wraps


def test_round_robin_pools_are_separate() -> None:
    r = make_router("round_robin")
    p, d = workers("p1", "p2"), workers("d1", "d2", role=DECODE)
    assert r.pick(p, rr(0)).worker_id == "p1"
    assert r.pick(d, rr(0, phase=DECODE)).worker_id == "d1"
    assert r.pick(p, rr(1)).worker_id == "p2"


def test_no_healthy_worker() -> None:
    r = make_router("least_loaded")
    ws = workers("a", "b")
    for w in ws:
        w.healthy = False
    with pytest.raises(
        NoHealthyWorkerError, match="no healthy prefill worker for model 'm': all 2"
    ):
        r.pick(ws, rr(0))
    with pytest.raises(NoHealthyWorkerError, match="no prefill worker for model 'x' is registered"):
        r.pick(workers("a"), RouteRequest("r", model="x"))
    with pytest.raises(NoHealthyWorkerError):
        r.pick([], rr(0))


def test_model_filter() -> None:
    r = make_router("round_robin")
    ws = workers("a", model="other") + workers("b") + workers("c", model="")
    assert {r.pick(ws, rr(i)).worker_id for i in range(4)} == {"b", "c"}


def test_least_loaded_uses_inflight_and_tokens_ties_by_id() -> None:
    r = make_router("least_loaded", token_weight=100)
    ws = workers("b", "a", "c")
    picks = []
    for i in range(6):
        req = rr(i)
        w = r.pick(ws, req)
        r.on_start(w, req)
        picks.append(w.worker_id)
    assert picks == ["a", "b", "c", "a", "b", "c"]  # spreads evenly, ties by id
    r2 = make_router("least_loaded", token_weight=100)
    r2.on_start(ws[1], rr(0, tokens=500))  # "a": 1 request + 5 "requests" of tokens
    r2.on_start(ws[0], rr(1, tokens=0))  # "b": 1 request
    r2.on_start(ws[0], rr(2, tokens=0))  # "b": 2 requests
    assert r2.pick(ws, rr(3)).worker_id == "c"
    r2.on_start(ws[2], rr(4, tokens=350))  # "c": 4.5
    assert r2.pick(ws, rr(5)).worker_id == "b"


def test_on_finish_is_idempotent_and_balances() -> None:
    r = make_router("least_loaded")
    (w,) = workers("a")
    req = rr(0, tokens=100)
    r.on_start(w, req)
    r.on_start(w, req)  # the same request twice counts once
    assert r.snapshot() == {"a": {"inflight": 1, "tokens": 100}}
    r.on_finish(w, req)
    r.on_finish(w, req)
    r.on_finish(w, rr(9))  # never started
    assert r.snapshot() == {"a": {"inflight": 0, "tokens": 0}}
    r.forget("a")
    assert r.snapshot() == {}


def test_least_loaded_reads_reported_load() -> None:
    r = make_router("least_loaded")
    ws = workers("a", "b")
    ws[0].update_load(
        worker_pb2.WorkerLoad(worker_id="a", running=3, waiting=2, queued_tokens=4096)
    )
    assert ws[0].running == 3 and ws[0].queued_tokens == 4096
    assert r.pick(ws, rr(0)).worker_id == "b"


def test_decode_prefers_free_kv() -> None:
    r = make_router("least_loaded")
    ws = workers("a", "b", role=DECODE)
    ws[0].free_kv_blocks, ws[0].total_kv_blocks = 10, 100
    ws[1].free_kv_blocks, ws[1].total_kv_blocks = 90, 100
    assert r.pick(ws, rr(0, phase=DECODE)).worker_id == "b"


def test_kv_aware_follows_prefix_hits() -> None:
    ctx = HashContext("m", 16, "float32")
    shared = list(range(64))
    r = make_router("kv_aware", token_weight=32)
    ws = workers("a", "b", "c")
    first = RouteRequest("r0", "m", 80, tuple(block_hashes(shared + [1] * 16, ctx)), 16)
    w = r.pick(ws, first)
    r.on_start(w, first)
    r.on_finish(w, first)
    assert w.worker_id == "a"
    # A request sharing the 4-block prefix goes back to "a" even though "a" is busier...
    r.on_start(ws[0], rr(90))
    assert r.pick(ws, rr(91)).worker_id == "b"
    again = RouteRequest("r1", "m", 80, tuple(block_hashes(shared + [2] * 16, ctx)), 16)
    assert r.pick(ws, again).worker_id == "a"
    # ...but one with a different prefix goes to an idle worker.
    other = RouteRequest("r2", "m", 80, tuple(block_hashes([7] * 80, ctx)), 16)
    assert r.pick(ws, other).worker_id == "b"


def test_kv_aware_custom_prefix_hits() -> None:
    r = KVAwareRouter(prefix_hits=lambda w, hs: len(hs) if w.worker_id == "c" else 0)
    assert r.pick(workers("a", "b", "c"), rr(0, block_hashes=(b"x" * 16,) * 8)).worker_id == "c"


def test_thread_safety_counts_balance() -> None:
    r = make_router("least_loaded")
    ws = workers("a", "b", "c")

    def worker(t: int) -> None:
        for i in range(200):
            req = RouteRequest(f"{t}-{i}", "m", 10)
            w = r.pick(ws, req)
            r.on_start(w, req)
            r.on_finish(w, req)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == {"inflight": 0, "tokens": 0} for v in r.snapshot().values())


def test_kv_aware_weighs_local_hits_store_blocks_and_load() -> None:
    r = KVAwareRouter(prefix_hits=lambda w, hs: 4 if w.worker_id == "a" else 0,
                      token_weight=64, store_block_cost=0.25)
    hs = (b"h" * 16,) * 4
    ws = workers("a", "b")
    # "a" holds all 4 blocks: 64 tokens of work saved, worth one request in flight
    assert r.pick(ws, rr(0, tokens=64, block_hashes=hs)).worker_id == "a"
    r.on_start(ws[0], rr(1))
    r.on_start(ws[0], rr(2))
    assert r.pick(ws, rr(3, tokens=64, block_hashes=hs)).worker_id == "b"  # too busy now
    # the store holds the prefix too: "b" only fetches it, so "a" is worth even less
    assert r.cost(ws[1], rr(4, tokens=64, block_hashes=hs, store_blocks=4)) == 0.25


def test_block_names_only_for_policies_that_use_them() -> None:
    ctx = HashContext("m", 16, "float32")

    def namer(ids, salt: str) -> tuple[bytes, ...]:
        return tuple(block_hashes(list(ids), ctx, cache_salt=salt))

    for name, named in (("kv_aware", True), ("round_robin", False), ("least_loaded", False)):
        got = make_router(name).name_blocks(namer, list(range(40)), "tenant")
        assert got == (namer(range(40), "tenant") if named else ())
