"""A colocated cluster (no prefill workers: each decode worker prefills and decodes in
one engine, chunked prefill beside the decodes) gives the same greedy tokens as the
split cluster, shares prefixes through the store, and leaks nothing."""

from __future__ import annotations

from collections.abc import Iterator
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
from tests.integration.test_cluster import prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def colocated(tiny_llama_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=0, decode=2)
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
