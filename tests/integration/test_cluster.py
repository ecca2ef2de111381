"""The split path end to end: real processes, real gRPC, both transports."""

from __future__ import annotations

import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.engine import LLM
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.conftest import MODEL_NAME, RunningCluster, expected, request

pytestmark = pytest.mark.slow


def prompts(n: int, seed: int, lo: int = 5, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_one_client_matches_single_process_engine(split_cluster: RunningCluster,
                                                  reference: LLM) -> None:
    for ids in prompts(3, seed=1):
        got = split_cluster.generate(request(ids, max_tokens=12))
        assert got.tokens == expected(reference, [ids], 12)[0]
        assert got.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert got.usage.prompt_tokens == len(ids)
        assert got.usage.completion_tokens == 12
        assert got.ttft > 0


def test_sixteen_concurrent_clients(split_cluster: RunningCluster, reference: LLM) -> None:
    batch = prompts(16, seed=2)
    want = expected(reference, batch, 10)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda ids: split_cluster.generate(request(ids, max_tokens=10)),
                            batch))
    assert [g.tokens for g in got] == want


def test_shared_prefix_hits_the_store(split_cluster: RunningCluster) -> None:
    rng = random.Random(split_cluster.settings.transfer.transport)
    prefix = [rng.randrange(3, 500) for _ in range(128)]
    first = split_cluster.generate(request(prefix + [7, 8, 9], max_tokens=2))
    assert first.usage.cached_tokens == 0
    # Round robin sends the second turn to the other prefill worker: the hit is in the store.
    second = split_cluster.generate(request(prefix + [10, 11, 12, 13], max_tokens=2))
    assert second.usage.cached_tokens == 128
    assert second.usage.prompt_tokens == 132


def test_text_prompt_streams_text(split_cluster: RunningCluster) -> None:
    got = split_cluster.generate(request(prompt="Hello, SplitServe! ", max_tokens=6))
    assert len(got.tokens) == 6
    assert got.usage.prompt_tokens > 0
    assert isinstance(got.text, str)


def _all_released(rc: RunningCluster) -> bool:
    stats = rc.store.stats()
    if stats.pins or stats.pinned_blocks or stats.owners:
        return False
    for ep in rc.settings.decode:
        with grpc.insecure_channel(ep.address) as ch:
            load = worker_pb2_grpc.DecodeWorkerStub(ch).GetLoad(worker_pb2.LoadRequest())
        if load.running or load.waiting or load.free_kv_blocks != load.total_kv_blocks:
            return False
    return True


def abort_mid_stream_frees_everything(rc: RunningCluster, seed: int) -> None:
    stream = rc.stub.Generate(request(prompts(1, seed=seed)[0], max_tokens=400), timeout=60)
    received = 0
    for resp in stream:
        received += len(resp.token_ids)
        if received >= 3:
            break
    stream.cancel()
    deadline = time.monotonic() + 10
    while not _all_released(rc):
        assert time.monotonic() < deadline, "blocks or pins still held after the abort"
        time.sleep(0.1)


def test_abort_mid_stream_frees_everything(split_cluster: RunningCluster) -> None:
    abort_mid_stream_frees_everything(split_cluster, seed=3)


def test_abort_rpc_by_request_id(split_cluster: RunningCluster) -> None:
    req = request(prompts(1, seed=4)[0], max_tokens=400)
    req.request_id = "abort-me-" + split_cluster.settings.transfer.transport
    stream = split_cluster.stub.Generate(req, timeout=60)
    next(iter(stream))
    assert split_cluster.stub.Abort(common_pb2.AbortRequest(request_id=req.request_id)).found
    tokens = sum(len(r.token_ids) for r in stream)
    assert tokens < 399
    deadline = time.monotonic() + 10
    while not _all_released(split_cluster):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_metrics_show_ttft_and_transfer_bytes(split_cluster: RunningCluster) -> None:
    split_cluster.generate(request(prompts(1, seed=5, lo=40, hi=60)[0], max_tokens=4))
    gateway = _metrics(split_cluster.settings.gateway.http_port)
    assert "splitserve_time_to_first_token_seconds_bucket" in gateway
    transport = split_cluster.settings.transfer.transport
    found = [
        line for ep in split_cluster.settings.prefill
        for line in _metrics(ep.http_port).splitlines()
        if line.startswith("splitserve_kv_transfer_bytes_total")
        and f'transport="{transport}"' in line and not line.rstrip().endswith(" 0.0")
    ]
    assert found, f"no {transport} transfer bytes counted by the prefill workers"


def test_list_models(split_cluster: RunningCluster) -> None:
    from splitserve.v1 import generation_pb2

    models = split_cluster.stub.ListModels(generation_pb2.ListModelsRequest()).models
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].prefill_workers == 2 and models[0].decode_workers == 2


def test_stop_string_ends_the_stream_without_its_text(split_cluster: RunningCluster,
                                                      reference: LLM) -> None:
    ids = prompts(1, seed=6)[0]
    full = split_cluster.generate(request(ids, max_tokens=24))
    text = full.text
    if len(text) < 6:
        pytest.skip("the random model produced too little text to cut")
    stop = text[3:5]
    cut = text.index(stop)
    got = split_cluster.generate(request(ids, max_tokens=24, stop=[stop]))
    assert got.finish_reason == common_pb2.FINISH_REASON_STOP
    assert got.text == text[:cut]
    assert stop not in got.text


def test_chat_messages_use_the_chat_template(split_cluster: RunningCluster) -> None:
    req = request(max_tokens=4)
    req.chat.messages.add(role="system", content="be brief")
    req.chat.messages.add(role="user", content="hi")
    got = split_cluster.generate(req)
    assert len(got.tokens) == 4
    assert got.usage.prompt_tokens > len("be brief") + len("hi")
    bad = request(max_tokens=4)
    bad.chat.messages.add(role="wizard", content="hi")
    with pytest.raises(grpc.RpcError) as err:
        list(split_cluster.stub.Generate(bad, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role" in err.value.details()
