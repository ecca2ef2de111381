"""Two models on one cluster (real processes, the Redis registry on): tiny-llama and
tiny-qwen3, one prefill and one decode worker each, one KV store. Each model answers
its own single-process engine's greedy tokens, through gRPC and the OpenAI front; an
unknown model is NOT_FOUND naming the served ones; ListModels and /v1/models list
both; a worker that joins through the registry serves the model it registered."""

from __future__ import annotations

import dataclasses
import json
import random
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.common.launcher import free_port
from services.common.server import wait_until
from services.common.settings import ClusterSettings, Endpoint, WorkerEndpoint
from services.engine import LLM
from splitserve.v1 import generation_pb2
from tests.integration.conftest import (
    MODEL_NAME,
    RunningCluster,
    cluster_settings,
    expected,
    metric,
    request,
    running_cluster,
    start_unlisted,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
QWEN = "tiny-qwen3"


def two_model_settings(llama_dir: Path, qwen_dir: Path) -> ClusterSettings:
    """tiny-llama and tiny-qwen3 with the same engine options; prefill[i] and decode[i]
    serve model i."""
    base = cluster_settings(llama_dir, prefill=2, decode=2, openai_port=free_port())
    llama = base.model
    models = [llama, dataclasses.replace(llama, name=QWEN, path=str(qwen_dir))]

    def serving(entries: list[Endpoint]) -> list[WorkerEndpoint]:
        return [WorkerEndpoint(**dataclasses.asdict(ep), model=m.name)
                for ep, m in zip(entries, models, strict=True)]

    return dataclasses.replace(base, models=models, prefill=serving(base.prefill),
                               decode=serving(base.decode),
                               redis_url=f"redis://127.0.0.1:{free_port()}/0")


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tiny_qwen3_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = two_model_settings(tiny_llama_dir, tiny_qwen3_dir)
    with running_cluster(settings, tmp_path_factory.mktemp("multi-model")) as rc:
        yield rc


@pytest.fixture(scope="module")
def qwen_reference(tiny_qwen3_dir: Path) -> LLM:
    return LLM(model=str(tiny_qwen3_dir), dtype="float32", max_model_len=512,
               num_kv_blocks=256, use_tqdm=False)


def for_model(model: str, ids: list[int], max_tokens: int = 8
              ) -> generation_pb2.GenerateRequest:
    req = request(ids, max_tokens=max_tokens)
    req.model = model
    return req


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 60))] for _ in range(n)]


def served(rc: RunningCluster) -> dict[str, generation_pb2.ModelInfo]:
    models = rc.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=5).models
    return {m.id: m for m in models}


def test_each_model_answers_its_own_tokens(cluster: RunningCluster, reference: LLM,
                                           qwen_reference: LLM) -> None:
    batch = prompts(6, seed=1)
    models = [MODEL_NAME, QWEN] * 3  # both at once, interleaved
    with ThreadPoolExecutor(len(batch)) as pool:
        got = list(pool.map(lambda m, ids: cluster.generate(for_model(m, ids)), models, batch))
    want = {MODEL_NAME: expected(reference, batch[0::2], 8),
            QWEN: expected(qwen_reference, batch[1::2], 8)}
    assert [g.tokens for g in got[0::2]] == want[MODEL_NAME]
    assert [g.tokens for g in got[1::2]] == want[QWEN]
    assert want[MODEL_NAME] != want[QWEN]  # two models, really


def test_an_unknown_or_missing_model_is_refused(cluster: RunningCluster) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cluster.generate(for_model("gpt-7", [5, 6, 7]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"served models: {MODEL_NAME}, {QWEN}" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        cluster.generate(for_model("", [5, 6, 7]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model is required" in e.value.details()


def test_list_models_and_the_openai_front(cluster: RunningCluster,
                                          qwen_reference: LLM) -> None:
    models = served(cluster)
    assert list(models) == [MODEL_NAME, QWEN]
    assert all(m.prefill_workers == 1 and m.decode_workers == 1 for m in models.values())
    base = f"http://127.0.0.1:{cluster.settings.gateway.openai_port}/v1"
    with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [MODEL_NAME, QWEN]
    ids = prompts(1, seed=2)[0]
    body = {"model": QWEN, "prompt": ids, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    post = urllib.request.Request(f"{base}/completions", json.dumps(body).encode(),
                                  {"content-type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        answer = json.load(r)
    assert answer["model"] == QWEN
    assert answer["choices"][0]["token_ids"] == expected(qwen_reference, [ids], 6)[0]


def test_requests_are_counted_per_model(cluster: RunningCluster) -> None:
    cluster.generate(for_model(QWEN, [9, 9, 9], max_tokens=2))
    with pytest.raises(grpc.RpcError):
        cluster.generate(for_model("no-such-model", [9]))
    port = cluster.settings.gateway.http_port
    assert metric(port, f'splitserve_requests_total{{model="{QWEN}",outcome="ok"}}') >= 1
    assert metric(port, f'splitserve_time_to_first_token_seconds_count{{model="{QWEN}"}}') >= 1
    # a name no model has is not a label (clients would choose the series): ""
    assert metric(port, 'splitserve_requests_total{model="",outcome="not_found"}') >= 1
    assert metric(port, 'splitserve_requests_total{model="no-such-model",outcome="not_found"}') == 0


def test_a_registered_worker_serves_its_model(cluster: RunningCluster, qwen_reference: LLM,
                                              tmp_path: Path) -> None:
    ep = WorkerEndpoint(port=free_port(), http_port=free_port(), model=QWEN)
    start_unlisted(cluster, "decode", ep, tmp_path)
    assert wait_until(lambda: served(cluster)[QWEN].decode_workers == 2, timeout_s=10)
    assert served(cluster)[MODEL_NAME].decode_workers == 1
    batch = prompts(2, seed=3)  # round robin: one on each of the model's decode workers
    for ids, want in zip(batch, expected(qwen_reference, batch, 5), strict=True):
        assert cluster.generate(for_model(QWEN, ids, max_tokens=5)).tokens == want
    decoded = r'splitserve_worker_tokens_total\{kind="decoded",role="decode"\}'
    assert metric(ep.http_port, decoded) > 0
