"""Issue 7, problems 4 and 5: deadlines are enforced and free everything; a frozen
worker fails its requests promptly; health tells the truth about the workers."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from splitserve.v1 import common_pb2
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    collect,
    request,
    running_cluster,
)
from tests.integration.test_cluster import _all_released
from tests.integration.test_failures import _health, _readyz

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING


WORKER_WAIT_S = 2.0


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.gateway.worker_wait_s = WORKER_WAIT_S
    with running_cluster(settings, tmp_path_factory.mktemp("gateway-deadlines")) as rc:
        yield rc


def _wait_released(cluster: RunningCluster, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not _all_released(cluster):
        assert time.monotonic() < deadline, "pins or worker blocks left behind"
        time.sleep(0.1)


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_1ms_deadline_is_exceeded_and_nothing_stays_pinned(cluster: RunningCluster) -> None:
    req = request(list(range(3, 200)), max_tokens=50)
    req.deadline_ms = 1
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in err.value.details()
    _wait_released(cluster)


def test_deadline_mid_stream_stops_it_and_frees_everything(cluster: RunningCluster) -> None:
    req = request([1, 2, 3, 4, 5], max_tokens=500)
    req.deadline_ms = 400
    start = time.monotonic()
    stream = cluster.stub.Generate(req, timeout=30)
    received = 0
    with pytest.raises(grpc.RpcError) as err:
        for msg in stream:
            received += len(msg.token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < received < 500
    assert time.monotonic() - start < 1.5
    _wait_released(cluster)


def test_frozen_decode_worker_fails_requests_and_health(cluster: RunningCluster) -> None:
    gw = cluster.settings.gateway
    decode = cluster.cluster.find("decode")
    stream = cluster.stub.Generate(request([1, 2, 3, 4, 5], max_tokens=400), timeout=60)
    it = iter(stream)
    next(it)
    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(collect, it)
        os.kill(decode.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            error = reader.exception(timeout=10)  # hangs here if the stream hangs
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert time.monotonic() - stopped_at < 6
            _until(lambda: _health(gw.address) != SERVING, 5, "health still SERVING")
            assert _readyz(gw.http_port) == 503
            asked = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                cluster.generate(request([1, 2, 3], max_tokens=2), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - asked >= WORKER_WAIT_S * 0.9  # it waited for one
        finally:
            os.kill(decode.proc.pid, signal.SIGCONT)
    _until(lambda: _health(gw.address) == SERVING, 10, "health never SERVING again")
    assert _readyz(gw.http_port) == 200
    got = cluster.generate(request([1, 2, 3], max_tokens=2), timeout=20)
    assert got.finish_reason == common_pb2.FINISH_REASON_LENGTH
    _wait_released(cluster)


def test_a_request_waits_out_a_decode_worker_that_missed_its_polls(
        cluster: RunningCluster) -> None:
    """The only decode worker stops answering (busy, frozen) and is marked down; a
    request arriving then waits for it rather than being refused, and completes."""
    gw = cluster.settings.gateway
    decode = cluster.cluster.find("decode")
    os.kill(decode.proc.pid, signal.SIGSTOP)
    try:
        _until(lambda: _health(gw.address) != SERVING, 5, "health still SERVING")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(cluster.generate, request([1, 2, 3], max_tokens=2),
                                 timeout=20)
            time.sleep(0.3)
            os.kill(decode.proc.pid, signal.SIGCONT)
            got = answer.result(timeout=20)
    finally:
        os.kill(decode.proc.pid, signal.SIGCONT)
    assert got.finish_reason == common_pb2.FINISH_REASON_LENGTH
    _wait_released(cluster)
