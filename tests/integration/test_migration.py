"""A worker killed mid-request: its requests move to another worker and finish with
exactly the single engine's tokens (none lost or repeated); nothing leaks."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.server import wait_until
from services.engine import LLM
from splitserve.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.conftest import (
    MODEL_NAME,
    Result,
    RunningCluster,
    cluster_settings,
    collect,
    expected,
    metric,
    request,
    running_cluster,
)

pytestmark = pytest.mark.slow



def _prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]



class Streams:
    """Concurrent Generate streams, read by threads; ``started`` once each has a token."""

    def __init__(self, cluster: RunningCluster, prompts: list[list[int]], max_tokens: int):
        self.results: list[Result | grpc.RpcError | None] = [None] * len(prompts)
        self.first = [threading.Event() for _ in prompts]
        self.threads = [threading.Thread(target=self._read, args=(cluster, i, p, max_tokens))
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _read(self, cluster: RunningCluster, i: int, prompt: list[int], n: int) -> None:
        def marked() -> Iterator:
            for msg in cluster.stub.Generate(request(prompt, max_tokens=n), timeout=120):
                if msg.token_ids:
                    self.first[i].set()
                yield msg

        try:
            self.results[i] = collect(marked())
        except grpc.RpcError as e:
            self.results[i] = e
        self.first[i].set()

    def join(self) -> list[Result]:
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"
        errors = [r for r in self.results if not isinstance(r, Result)]
        assert not errors, errors
        return self.results  # type: ignore[return-value]


def _migrations(cluster: RunningCluster) -> float:
    return metric(cluster.settings.gateway.http_port,
                  rf'splitserve_migrations_total\{{model="{MODEL_NAME}"\}}')


def _nothing_left(cluster: RunningCluster, survivors: list[tuple[str, int]]) -> None:
    assert wait_until(lambda: (s := cluster.store.stats()).pins == 0 and s.owners == 0,
                      timeout_s=15), cluster.store.stats()
    for role, index in survivors:
        ep = getattr(cluster.settings, role)[index]
        stub_cls = (worker_pb2_grpc.PrefillWorkerStub if role == "prefill"
                    else worker_pb2_grpc.DecodeWorkerStub)
        with grpc.insecure_channel(ep.address) as ch:
            stub = stub_cls(ch)

            def free(stub: object = stub) -> bool:
                load = stub.GetLoad(worker_pb2.LoadRequest(), timeout=5,
                                    metadata=_secret(cluster))
                return load.free_kv_blocks == load.total_kv_blocks

            assert wait_until(free, timeout_s=15), f"{role} {index} kept blocks"


def _secret(cluster: RunningCluster) -> tuple[tuple[str, str], ...]:
    from services.common.auth import call_metadata

    return call_metadata(cluster.settings)


@pytest.fixture
def two_decoders(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[RunningCluster]:
    with running_cluster(cluster_settings(tiny_llama_dir, prefill=1, decode=2), tmp_path) as rc:
        yield rc


def test_killed_decode_worker_moves_its_streams(two_decoders: RunningCluster,
                                                reference: LLM) -> None:
    prompts = _prompts(8, seed=11, lo=20, hi=60)
    streams = Streams(two_decoders, prompts, max_tokens=400)
    assert all(e.wait(60) for e in streams.first)
    two_decoders.cluster.kill("decode", 0)
    got = streams.join()
    assert [r.tokens for r in got] == expected(reference, prompts, 400)
    assert _migrations(two_decoders) >= 1
    _nothing_left(two_decoders, [("prefill", 0), ("decode", 1)])


@pytest.fixture
def two_prefills(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=2, decode=1)
    settings.model.max_num_batched_tokens = 16  # long prompts take many steps
    with running_cluster(settings, tmp_path) as rc:
        yield rc


def test_killed_prefill_worker_moves_its_prompts(two_prefills: RunningCluster,
                                                 reference: LLM) -> None:
    prompts = _prompts(16, seed=12, lo=300, hi=400)
    streams = Streams(two_prefills, prompts, max_tokens=8)
    assert any(e.wait(60) for e in streams.first)
    two_prefills.cluster.kill("prefill", 0)
    got = streams.join()
    assert [r.tokens for r in got] == expected(reference, prompts, 8)
    assert _migrations(two_prefills) >= 1
    _nothing_left(two_prefills, [("prefill", 1), ("decode", 0)])


@pytest.fixture
def two_of_each(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=2, decode=2)
    settings.model.max_num_batched_tokens = 64
    with running_cluster(settings, tmp_path) as rc:
        yield rc


def test_chaos_workers_killed_and_restarted(two_of_each: RunningCluster,
                                            reference: LLM) -> None:
    """32 streams while a random worker is killed and started again, again and again:
    every stream completes exactly; nothing leaks."""
    prompts = _prompts(32, seed=13, lo=30, hi=200)
    lengths = [random.Random(i).randint(50, 120) for i in range(32)]
    rng = random.Random(14)
    kills: list[str] = []
    streams = [Streams(two_of_each, [p], max_tokens=n) for p, n in zip(prompts, lengths,
                                                                       strict=True)]
    # the chaos runs on this thread: a service dies with the thread that started it
    # (Linux's parent-death signal follows the thread)
    while any(t.is_alive() for s in streams for t in s.threads):
        time.sleep(0.5)
        role, index = rng.choice(["prefill", "decode"]), rng.randrange(2)
        two_of_each.cluster.kill(role, index)
        kills.append(f"{role}-{index}")
        two_of_each.cluster.start_service(role, index)
    got = [s.join()[0] for s in streams]
    want = [expected(reference, [p], n)[0] for p, n in zip(prompts, lengths, strict=True)]
    assert [r.tokens for r in got] == want
    assert kills, "nothing was killed"
    _nothing_left(two_of_each, [("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)])


def test_store_killed_and_restarted_mid_stream(two_decoders: RunningCluster,
                                               reference: LLM) -> None:
    """The store dies (SIGKILL) under running streams and comes back empty: streams
    in flight go on, and requests that arrive meanwhile recompute what the store lost
    instead of failing; every stream equals the reference; nothing leaks."""
    first = _prompts(6, seed=15, lo=20, hi=60)
    later = _prompts(6, seed=16, lo=20, hi=60)
    streams = Streams(two_decoders, first, max_tokens=300)
    assert all(e.wait(60) for e in streams.first)
    two_decoders.cluster.kill("kvstore", 0)
    arrivals = Streams(two_decoders, later, max_tokens=40)  # while the store is away
    time.sleep(0.5)
    two_decoders.cluster.start_service("kvstore", 0)
    assert [r.tokens for r in streams.join()] == expected(reference, first, 300)
    assert [r.tokens for r in arrivals.join()] == expected(reference, later, 40)
    _nothing_left(two_decoders, [("prefill", 0), ("decode", 0), ("decode", 1)])
