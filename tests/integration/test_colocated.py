"""A colocated cluster (no prefill workers: each decode worker prefills and decodes in
one engine, chunked prefill beside the decodes) gives the same greedy tokens as the
split cluster, shares prefixes through the store, and leaks nothing — with the
engines' async scheduling off and forced on (set in the cluster YAML)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.server import wait_until
from services.engine import LLM
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    expected,
    request,
    running_cluster,
)
from tests.integration.test_cluster import abort_mid_stream_frees_everything, prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def colocated(request: pytest.FixtureRequest, tiny_llama_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=0, decode=2)
    settings.model.async_scheduling = request.param
    with running_cluster(settings, tmp_path_factory.mktemp("colocated")) as rc:
        yield rc


def test_colocated_tokens_equal_the_engine_and_the_split_cluster(colocated: RunningCluster,
                                                                  reference: LLM) -> None:
    ref = reference
    ids = prompts(4, seed=21)
    got = [colocated.generate(request(p, max_tokens=10)) for p in ids]
    assert [g.tokens for g in got] == expected(ref, ids, 10)
    assert all(g.ttft > 0 and g.usage.completion_tokens == 10 for g in got)


def test_colocated_workers_share_prefixes_through_the_store(colocated: RunningCluster) -> None:
    shared = list(range(10, 10 + 64))
    first = colocated.generate(request(shared + [5, 6, 7], max_tokens=4))
    second = colocated.generate(request(shared + [8, 9], max_tokens=4))  # the other worker
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == 64
    assert wait_until(lambda: (s := colocated.store.stats()).pins == 0 and s.owners == 0,
                      timeout_s=10)


def test_concurrent_clients_of_different_lengths(colocated: RunningCluster,
                                                 reference: LLM) -> None:
    batch = prompts(8, seed=31)
    lengths = [3 + i % 9 for i in range(len(batch))]
    want = [expected(reference, [p], n)[0] for p, n in zip(batch, lengths, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: colocated.generate(request(a[0], max_tokens=a[1])),
                            zip(batch, lengths, strict=True)))
    assert [g.tokens for g in got] == want


def test_abort_mid_stream_frees_everything(colocated: RunningCluster) -> None:
    abort_mid_stream_frees_everything(colocated, seed=32)
