"""The OpenAI-compatible HTTP front, through the official ``openai`` client, against a
real cluster: the same tokens and text as the gRPC front, streamed or not, chat and
completions, usage with cached tokens, OpenAI errors, and a dropped stream that
leaves nothing held."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from services.common.launcher import free_port
from splitserve.v1 import common_pb2, generation_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.conftest import (
    MODEL_NAME,
    RunningCluster,
    cluster_settings,
    request,
    running_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1, openai_port=free_port())
    with running_cluster(settings, tmp_path_factory.mktemp("openai-front")) as rc:
        yield rc


@pytest.fixture(scope="module")
def client(cluster: RunningCluster) -> Iterator[openai.OpenAI]:
    base = f"http://127.0.0.1:{cluster.settings.gateway.openai_port}/v1"
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def _ids(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def _chat_request(max_tokens: int) -> generation_pb2.GenerateRequest:
    req = request(max_tokens=max_tokens)
    req.chat.messages.extend(generation_pb2.ChatMessage(**m) for m in MESSAGES)
    return req


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_matches_grpc(cluster: RunningCluster, client: openai.OpenAI) -> None:
    ids = _ids(1)
    want = cluster.generate(request(ids, max_tokens=12))
    got = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True,
                                                               "return_token_ids": True})
    choice = got.choices[0]
    assert choice.token_ids == want.tokens
    assert choice.text == want.text
    assert choice.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 12)
    assert got.object == "text_completion" and got.model == MODEL_NAME


def test_streamed_completion_matches_grpc(cluster: RunningCluster,
                                          client: openai.OpenAI) -> None:
    want = cluster.generate(request(prompt="Hello, SplitServe!", max_tokens=10))
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Hello, SplitServe!", max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == want.tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_matches_grpc_streamed_or_not(cluster: RunningCluster,
                                           client: openai.OpenAI) -> None:
    want = cluster.generate(_chat_request(max_tokens=9))
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_completion_tokens": 9,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == want.usage.prompt_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    ids = _ids(2, n=70)  # 4 full blocks of 16
    usages = [client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2,
                                        temperature=0).usage for _ in range(2)]
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens == 64
    assert usages[1].total_tokens == 72


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"temperature": -1}, "temperature", "temperature must be in [0, 100]"),
    ({"top_p": "high"}, "top_p", "top_p must be a number"),
    ({"max_tokens": 600}, "max_tokens", "set max_tokens to at most"),
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": 3}, "logprobs", "not supported"),
    ({"prompt": [1, 2, 9999]}, "prompt", "prompt[2] = 9999 is out of range"),
    ({"prompt": ["one", "two"]}, "prompt", "one prompt per request"),
    ({"frobnicate": 1}, "frobnicate", "unknown field"),
])
def test_bad_field_is_400_naming_it(client: openai.OpenAI, body: dict, param: str,
                                    words: str) -> None:
    args = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 4} | body
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{k: v for k, v in args.items() if k in ("model", "prompt")},
                                  extra_body={k: v for k, v in args.items()
                                              if k not in ("model", "prompt")})
    assert err.value.param == param
    assert words in err.value.message
    assert err.value.body["type"] == "invalid_request_error"


def test_chat_errors_name_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, n=2, messages=MESSAGES)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME,
                                       messages=[{"role": "robot", "content": "hi"}])
    assert err.value.param == "messages" and "role must be one of" in err.value.message


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert err.value.param == "model" and "tiny-llama" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)


def _all_released(cluster: RunningCluster) -> bool:
    stats = cluster.store.stats()
    if stats.pins or stats.pinned_blocks or stats.owners:
        return False
    for ep in cluster.settings.decode:
        with grpc.insecure_channel(ep.address) as ch:
            load = worker_pb2_grpc.DecodeWorkerStub(ch).GetLoad(worker_pb2.LoadRequest())
        if load.running or load.waiting or load.free_kv_blocks != load.total_kv_blocks:
            return False
    return True


def _cancelled_requests(cluster: RunningCluster) -> float:
    url = f"http://127.0.0.1:{cluster.settings.gateway.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'splitserve_requests_total{{model="{MODEL_NAME}",'
                               'outcome="cancelled"}'):
                return float(line.split()[-1])
    return 0.0


def test_dropped_stream_leaves_nothing_pinned(cluster: RunningCluster,
                                              client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL_NAME, prompt=_ids(3), max_tokens=400,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    cancelled = _cancelled_requests(cluster)
    for received, _ in enumerate(stream, start=1):
        if received >= 3:
            break
    stream.close()  # the connection goes; the request must go with it
    deadline = time.monotonic() + 10
    while not _all_released(cluster) or _cancelled_requests(cluster) == cancelled:
        assert time.monotonic() < deadline, "the request still runs, or holds blocks or pins"
        time.sleep(0.1)
    # ...and the gateway serves on.
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2,
                                     temperature=0).usage.completion_tokens >= 1


def test_bench_serve_openai_backend(cluster: RunningCluster, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "services.cli", "bench", "serve", "--no-tqdm",
           "--backend", "openai", "--out", str(out),
           "--address", f"http://127.0.0.1:{cluster.settings.gateway.openai_port}/v1",
           "--max-len", "512", "--input-len", "16,48", "--output-len", "3,6", "--num", "4",
           "--arrivals", "closed", "--concurrency", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["requests"], summary["failed"]) == (4, 0)
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert all(x["ttft_s"] > 0 and x["output_tokens"] >= 3 for x in lines)


def test_grpc_front_still_serves_beside_it(cluster: RunningCluster) -> None:
    got = cluster.generate(request([5, 6, 7], max_tokens=3))
    assert got.finish_reason == common_pb2.FINISH_REASON_LENGTH
