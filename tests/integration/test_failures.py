"""Readiness gating, a full admission queue, and a worker that dies mid-request."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.launcher import LocalCluster
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import generation_pb2_grpc
from tests.integration.conftest import cluster_settings, collect, request, start_cluster

pytestmark = pytest.mark.slow


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=2).status
        except grpc.RpcError:
            return -1


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_gateway_serving_only_once_workers_are_ready(tiny_llama_dir: Path,
                                                     tmp_path: Path) -> None:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    config = tmp_path / "cluster.yaml"
    settings.dump_yaml(config)
    store_and_gateway = LocalCluster(settings, config, tmp_path, roles=("kvstore",))
    store_and_gateway.start()
    gateway = store_and_gateway._start_one("gateway", 0, settings.gateway)
    workers = LocalCluster(settings, config, tmp_path, roles=("prefill", "decode"))
    try:
        time.sleep(3)
        assert gateway.alive()
        assert _health(settings.gateway.address) != health_pb2.HealthCheckResponse.SERVING
        assert _readyz(settings.gateway.http_port) == 503
        workers.start()
        deadline = time.monotonic() + 30
        while _health(settings.gateway.address) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "gateway never became SERVING"
            time.sleep(0.2)
        assert _readyz(settings.gateway.http_port) == 200
    finally:
        workers.stop()
        store_and_gateway.stop()


@pytest.fixture
def small_cluster(tiny_llama_dir: Path, tmp_path: Path):
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1, max_model_len=1024,
                                max_inflight=1, max_queue=1)
    cluster = start_cluster(settings, tmp_path)
    channel = grpc.insecure_channel(settings.gateway.address)
    try:
        yield cluster, generation_pb2_grpc.GenerationStub(channel)
    finally:
        channel.close()
        cluster.stop()


def test_full_queue_is_refused_with_retry_hint(small_cluster) -> None:
    cluster, stub = small_cluster
    # One slot and a queue of one: of four long requests sent at once, at least two are
    # refused on arrival.
    calls = [stub.Generate(request([1, 2, 3, i], max_tokens=1000), timeout=60)
             for i in range(4)]
    try:
        deadline = time.monotonic() + 10
        refused = []
        while len(refused) < 2:
            assert time.monotonic() < deadline, "no request was refused"
            refused = [c for c in calls
                       if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            time.sleep(0.01)
        for call in refused:
            assert "retry" in call.details()
            assert int(dict(call.trailing_metadata())["retry-after-ms"]) > 0
    finally:
        for call in calls:
            call.cancel()


def test_killed_decode_worker_fails_requests_with_unavailable(small_cluster) -> None:
    cluster, stub = small_cluster
    stream = stub.Generate(request([1, 2, 3, 4, 5], max_tokens=400), timeout=60)
    it = iter(stream)
    next(it)
    outcome: dict[str, object] = {}

    def drain() -> None:
        try:
            collect(it)
            outcome["code"] = None
        except grpc.RpcError as e:
            outcome["code"] = e.code()

    reader = threading.Thread(target=drain)
    reader.start()
    cluster.kill("decode", 0)
    reader.join(timeout=15)
    assert not reader.is_alive(), "the stream hung after its decode worker died"
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
    # New requests fail fast too, rather than hang.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request([1, 2, 3], max_tokens=2), timeout=20))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_stops_every_service_cleanly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cluster = start_cluster(cluster_settings(tiny_llama_dir, prefill=1, decode=1), tmp_path)
    channel = grpc.insecure_channel(cluster.settings.gateway.address)
    stub = generation_pb2_grpc.GenerationStub(channel)
    assert collect(stub.Generate(request([1, 2, 3], max_tokens=3), timeout=30)).tokens
    channel.close()
    cluster.stop()
    assert {s.name: s.proc.returncode for s in cluster.services} == {
        s.name: 0 for s in cluster.services}


def test_full_store_refuses_cleanly_and_leaks_nothing(tiny_llama_dir: Path,
                                                      tmp_path: Path) -> None:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.kvstore.cpu_bytes = 96 << 10  # a dozen 8 KiB blocks
    cluster = start_cluster(settings, tmp_path)
    channel = grpc.insecure_channel(settings.gateway.address)
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(list(range(3, 403)), max_tokens=2), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "kv store" in err.value.details()
        assert collect(stub.Generate(request([1, 2, 3], max_tokens=3), timeout=30)).tokens
        with KVStoreClient(settings.kvstore.address) as store:
            deadline = time.monotonic() + 5
            while (stats := store.stats()).pins or stats.owners:
                assert time.monotonic() < deadline, f"pins left behind: {stats}"
                time.sleep(0.1)
    finally:
        channel.close()
        cluster.stop()
