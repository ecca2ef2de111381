"""A cluster on the Redis registry (real redis-server, started by the launcher as `up`
does): a decode worker the gateway's config does not name joins and takes requests,
one killed drops out of the registry within the TTL, and Redis killed and restarted
leaves the cluster serving, then rebuilt."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.launcher import free_port, start_redis
from services.common.registry import Keys, read_members
from services.common.server import wait_until
from services.common.settings import Endpoint
from services.engine import LLM
from splitserve.v1 import generation_pb2
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    expected,
    metric,
    request,
    running_cluster,
    start_unlisted,
)

TTL_S = 1.5


@pytest.fixture(scope="module")
def reg_cluster(tiny_llama_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    settings.registry_ttl_s, settings.registry_heartbeat_s = TTL_S, 0.25
    with running_cluster(settings, tmp_path_factory.mktemp("registry")) as rc:
        assert rc.cluster.redis is not None and rc.cluster.redis.alive()  # started by the launcher
        yield rc



def _decoded(port: int) -> float:
    return metric(port, r'splitserve_worker_tokens_total\{kind="decoded",role="decode"\}')


def _decode_workers(rc: RunningCluster) -> int:
    return rc.stub.ListModels(generation_pb2.ListModelsRequest()).models[0].decode_workers


def _members(rc: RunningCluster) -> set[str]:
    client = redis.Redis.from_url(rc.settings.redis_url)
    try:
        return set(read_members(client, Keys(rc.settings.registry_namespace)))
    except redis.RedisError:
        return set()
    finally:
        client.close()


def _readyz(rc: RunningCluster) -> int:
    try:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{rc.settings.gateway.http_port}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_registered_members_and_a_late_worker(reg_cluster: RunningCluster, reference: LLM,
                                              tmp_path: Path) -> None:
    rc, s = reg_cluster, reg_cluster.settings
    assert _members(rc) == {f"kvstore/{s.kvstore.address}", f"prefill/{s.prefill[0].address}",
                            f"decode/{s.decode[0].address}"}
    ep = Endpoint(port=free_port(), http_port=free_port())
    svc = start_unlisted(rc, "decode", ep, tmp_path)
    assert wait_until(lambda: _decode_workers(rc) == 2, timeout_s=5)  # one heartbeat + a poll
    prompts = [[7 + i] * 20 for i in range(4)]  # round_robin: both decode workers serve
    for p in prompts:
        assert rc.generate(request(p, max_tokens=5)).tokens == expected(reference, [p], 5)[0]
    assert _decoded(ep.http_port) > 0 and _decoded(s.decode[0].http_port) > 0

    svc.proc.kill()  # SIGKILL: no goodbye; the registry forgets it within the TTL
    svc.proc.wait()
    gone = f"decode/{ep.address}"
    assert wait_until(lambda: gone not in _members(rc), timeout_s=TTL_S + 1.0)
    assert wait_until(lambda: _decode_workers(rc) == 1, timeout_s=2)
    for p in prompts:
        assert rc.generate(request(p, max_tokens=5)).tokens == expected(reference, [p], 5)[0]
    assert wait_until(lambda: rc.store.stats().pinned_blocks == 0, timeout_s=10)


def test_redis_lost_and_back(reg_cluster: RunningCluster, reference: LLM) -> None:
    rc, s = reg_cluster, reg_cluster.settings
    gw_port = s.gateway.http_port
    assert metric(gw_port, "splitserve_registry_connected") == 1
    port = rc.cluster.redis.port
    rc.cluster.redis.stop()
    assert wait_until(lambda: metric(gw_port, "splitserve_registry_connected") == 0,
                      timeout_s=5)
    assert _readyz(rc) == 200  # degraded, still serving with its last view
    p = [3] * 40
    assert rc.generate(request(p, max_tokens=5)).tokens == expected(reference, [p], 5)[0]

    rc.cluster.redis = start_redis(port)  # empty: every member writes itself again
    want = {f"kvstore/{s.kvstore.address}", f"prefill/{s.prefill[0].address}",
            f"decode/{s.decode[0].address}"}
    assert wait_until(lambda: _members(rc) == want, timeout_s=10)
    assert wait_until(lambda: metric(gw_port, "splitserve_registry_connected") == 1,
                      timeout_s=5)
    assert rc.generate(request(p, max_tokens=5)).tokens == expected(reference, [p], 5)[0]
