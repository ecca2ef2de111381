"""A split cluster whose workers run async scheduling (forced on for the CPU, set in
the cluster YAML): the engine's tokens for concurrent clients, and aborts in the
middle of a stream free everything."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.engine import LLM
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    expected,
    request,
    running_cluster,
)
from tests.integration.test_cluster import _all_released, prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def async_cluster(tiny_llama_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.model.async_scheduling = True
    with running_cluster(settings, tmp_path_factory.mktemp("async")) as rc:
        yield rc


def test_concurrent_clients_get_the_engine_tokens(async_cluster: RunningCluster,
                                                  reference: LLM) -> None:
    batch = prompts(8, seed=31)
    lengths = [3 + i % 9 for i in range(len(batch))]
    want = [expected(reference, [p], n)[0] for p, n in zip(batch, lengths, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: async_cluster.generate(request(a[0], max_tokens=a[1])),
                            zip(batch, lengths, strict=True)))
    assert [g.tokens for g in got] == want


def test_abort_mid_stream_frees_everything(async_cluster: RunningCluster) -> None:
    stream = async_cluster.stub.Generate(request(prompts(1, seed=32)[0], max_tokens=400),
                                         timeout=60)
    received = 0
    for resp in stream:
        received += len(resp.token_ids)
        if received >= 3:
            break
    stream.cancel()
    deadline = time.monotonic() + 10
    while not _all_released(async_cluster):
        assert time.monotonic() < deadline, "blocks or pins still held after the abort"
        time.sleep(0.1)
