"""kv_aware routing on the workers' KV events (Redis registry): requests sharing a long
prefix go to the prefill worker whose prefix cache holds it, unique prompts still
spread, and the tokens are the single engine's."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from services.common.launcher import free_port
from services.common.registry import Keys
from services.common.server import wait_until
from services.engine import LLM
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    expected,
    metric,
    request,
    running_cluster,
)

BS = 16
PREFIX_BLOCKS = 8



@pytest.fixture(scope="module")
def kv_cluster(tiny_llama_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=2, decode=1, routing="kv_aware")
    settings.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    with running_cluster(settings, tmp_path_factory.mktemp("kv-routing")) as rc:
        yield rc



def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _engine_blocks(port: int) -> float:
    return metric(port, r'splitserve_kv_connector_blocks_total\{role="prefill",'
                                  r'source="engine"\}')


def _prefilled(port: int) -> float:
    return metric(port, r'splitserve_worker_tokens_total\{kind="prefill_computed",'
                                  r'role="prefill"\}')


def _kvset_size(rc: RunningCluster, address: str) -> int:
    client = redis.Redis.from_url(rc.settings.redis_url)
    try:
        return client.scard(Keys(rc.settings.registry_namespace).kvset(f"prefill/{address}"))
    finally:
        client.close()


def test_shared_prefix_goes_where_it_is_cached(kv_cluster: RunningCluster,
                                               reference: LLM) -> None:
    rc = kv_cluster
    ports = [ep.http_port for ep in rc.settings.prefill]
    prefix = _tokens(PREFIX_BLOCKS * BS, 1)
    first = prefix + _tokens(5, 2)
    assert rc.generate(request(first, max_tokens=4)).tokens == expected(reference, [first], 4)[0]
    holder = max(range(2), key=lambda i: _prefilled(ports[i]))
    other = 1 - holder
    address = rc.settings.prefill[holder].address
    assert wait_until(lambda: _kvset_size(rc, address) >= PREFIX_BLOCKS, timeout_s=5)
    time.sleep(0.5)  # the gateway's next registry read
    before = [_engine_blocks(p) for p in ports]
    other_prefilled = _prefilled(ports[other])
    store_port = rc.settings.kvstore.http_port
    looked_up = metric(store_port, "splitserve_kvstore_lookup_hit_blocks_total")
    for i in range(3):
        prompt = prefix + _tokens(7 + i, 10 + i)
        got = rc.generate(request(prompt, max_tokens=4))
        assert got.tokens == expected(reference, [prompt], 4)[0]
        assert got.usage.cached_tokens == PREFIX_BLOCKS * BS
    after = [_engine_blocks(p) for p in ports]
    assert after[holder] - before[holder] == 3 * PREFIX_BLOCKS  # its own prefix cache
    assert after[other] == before[other] and _prefilled(ports[other]) == other_prefilled
    # the gateway asked the store too (a worker without the prefix could fetch it)
    hit = metric(store_port, "splitserve_kvstore_lookup_hit_blocks_total")
    assert hit - looked_up == 3 * PREFIX_BLOCKS
    assert wait_until(lambda: rc.store.stats().pinned_blocks == 0, timeout_s=10)


def test_unique_prompts_still_spread(kv_cluster: RunningCluster, reference: LLM) -> None:
    rc = kv_cluster
    ports = [ep.http_port for ep in rc.settings.prefill]
    before = [_prefilled(p) for p in ports]
    prompts = [_tokens(3 * BS + 3, 100 + i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: rc.generate(request(p, max_tokens=4)), prompts))
    for p, r in zip(prompts, results, strict=True):
        assert r.tokens == expected(reference, [p], 4)[0]
    after = [_prefilled(p) for p in ports]
    assert all(a > b for a, b in zip(after, before, strict=True))  # both workers computed


def test_with_one_prefill_worker_left_the_store_is_not_looked_up(
        kv_cluster: RunningCluster, reference: LLM) -> None:
    """kv_aware with no choice to make: once the gateway knows one prefill worker is
    left, a request costs no Lookup of the store (nor the hashing of its prompt), and
    is still served right. Runs last: it stops a prefill worker of the module's cluster."""
    rc = kv_cluster
    lookups = r'splitserve_kvstore_rpc_seconds_count\{method="Lookup"\}'
    store_port = rc.settings.kvstore.http_port
    rc.cluster.kill("prefill", 1)
    seed = iter(range(200, 400))

    def served_without_lookup() -> bool:
        before = metric(store_port, lookups)
        prompt = _tokens(4 * BS + 3, next(seed))
        assert rc.generate(request(prompt, max_tokens=3)).tokens == \
            expected(reference, [prompt], 3)[0]
        return metric(store_port, lookups) == before

    assert wait_until(served_without_lookup, timeout_s=20, poll_s=0.2)
    assert served_without_lookup()
    assert wait_until(lambda: rc.store.stats().pinned_blocks == 0, timeout_s=10)
