"""Issue 7, problems 1 and 10: overload is refused at once while health, metrics and
small calls keep answering; refusals are counted; gateway memory stays flat."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.v1 import generation_pb2
from tests.integration.conftest import (
    MODEL_NAME,
    RunningCluster,
    cluster_settings,
    metric,
    running_cluster,
)
from tests.integration.test_cluster import _all_released
from tests.integration.test_failures import _readyz

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One prefill and one decode worker; the gateway's default admission limits."""
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    with running_cluster(settings, tmp_path_factory.mktemp("gateway-load")) as rc:
        yield rc


def _load(cluster: RunningCluster, out: Path, *args: str) -> subprocess.Popen:
    pid = cluster.cluster.find("gateway").proc.pid
    cmd = [sys.executable, "-m", "bench.gateway_load", "--address",
           cluster.settings.gateway.address, "--gateway-pid", str(pid), "--json", str(out),
           *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)


def _timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_600_streams_end_ok_or_refused_while_health_answers(cluster: RunningCluster,
                                                             tmp_path: Path) -> None:
    gw = cluster.settings.gateway
    refused_metric = ('splitserve_requests_total'
                      f'{{model="{MODEL_NAME}",outcome="resource_exhausted"}}')
    refused_before = metric(gw.http_port, re.escape(refused_metric))
    out = tmp_path / "load.json"
    load = _load(cluster, out, "--streams", "600", "--max-tokens", "64")
    health = health_pb2_grpc.HealthStub(cluster.channel)
    slowest = 0.0
    try:
        while load.poll() is None:
            slowest = max(
                slowest,
                _timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)),
                _timed(lambda: cluster.stub.ListModels(generation_pb2.ListModelsRequest(),
                                                       timeout=1.0)),
                _timed(lambda: _readyz(gw.http_port)),
            )
            time.sleep(0.2)
        assert load.wait(timeout=120) == 0
    finally:
        load.kill()
    report = json.loads(out.read_text())
    codes = report["codes"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    # 600 at once against max_inflight 64 + max_queue 256: about the rest is refused on
    # arrival (a few more are served, as the first ones finish while the last arrive).
    assert sum(codes.values()) == 600
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= (600 - gw.max_inflight - gw.max_queue) // 2
    assert codes.get("OK", 0) >= gw.max_inflight + gw.max_queue
    assert report["refusals_without_retry_hint"] == 0
    assert slowest < 1.0, f"health/ListModels/readyz took {slowest:.2f}s under load"
    refused = metric(gw.http_port, re.escape(refused_metric)) - refused_before
    assert refused == codes.get("RESOURCE_EXHAUSTED", 0)
    deadline = time.monotonic() + 10
    while not _all_released(cluster):
        assert time.monotonic() < deadline, "pins or worker blocks left after the load"
        time.sleep(0.1)


def test_memory_stays_flat_over_many_requests(cluster: RunningCluster, tmp_path: Path) -> None:
    """The soak of bench/RESULTS.md, shortened: RSS after warm-up does not keep growing."""
    out = tmp_path / "soak.json"
    load = _load(cluster, out, "--streams", "16", "--requests", "2400", "--max-tokens", "1",
                 "--rss-every", "400", "--text", "--prompt-len", "48")
    assert load.wait(timeout=240) == 0
    report = json.loads(out.read_text())
    assert report["codes"] == {"OK": 2400}
    rss = report["gateway_rss_mib"]
    warm, end = rss[2], rss[-1]  # after 800 requests, after 2400
    # 2.8 KB/request of growth would be 4.5 MiB here.
    assert end - warm < 2.0, f"gateway RSS grew {end - warm:.1f} MiB over 1600 requests: {rss}"
