"""A real cluster on loopback: store, 2 prefill, 2 decode, gateway as processes."""

from __future__ import annotations

import copy
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.common.auth import call_metadata
from services.common.launcher import LocalCluster, ServiceProcess, spawn, with_free_ports
from services.common.settings import ClusterSettings, Endpoint, ModelSettings
from services.engine import LLM, SamplingParams
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

MODEL_NAME = "tiny-llama"


@pytest.fixture(scope="session")
def reference(tiny_llama_dir: Path) -> LLM:
    """The single-process engine every cluster's tokens are checked against."""
    return LLM(model=str(tiny_llama_dir), dtype="float32", max_model_len=512,
               num_kv_blocks=256, use_tqdm=False)


def expected(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of ``llm`` for each prompt (eos ignored)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def cluster_settings(model_dir: Path, transport: str = "auto", prefill: int = 2,
                     decode: int = 2, max_model_len: int = 512,
                     **gateway: object) -> ClusterSettings:
    s = ClusterSettings(
        model=ModelSettings(name=MODEL_NAME, path=str(model_dir), max_model_len=max_model_len,
                            num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=512),
        prefill=[Endpoint() for _ in range(prefill)],
        decode=[Endpoint() for _ in range(decode)],
        ready_timeout_s=90.0,
    )
    s.transfer.transport = transport
    s.kvstore.cpu_bytes = 64 << 20
    for k, v in gateway.items():
        setattr(s.gateway, k, v)
    return with_free_ports(s)


def start_cluster(settings: ClusterSettings, tmp: Path) -> LocalCluster:
    config = tmp / "cluster.yaml"
    settings.dump_yaml(config)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    return LocalCluster(settings, config, logs).start()


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    usage: common_pb2.Usage | None = None
    ttft: float = 0.0


def collect(responses: Iterator[generation_pb2.GenerateResponse]) -> Result:
    r = Result()
    for resp in responses:
        r.tokens += list(resp.token_ids)
        r.text += resp.text
        if resp.ttft_seconds:
            r.ttft = resp.ttft_seconds
        if resp.finish_reason:
            r.finish_reason = resp.finish_reason
            r.usage = resp.usage
    return r


def request(ids: list[int] | None = None, prompt: str | None = None, max_tokens: int = 8,
            **sampling: object) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(
        model=MODEL_NAME,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
    )
    if ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    if prompt is not None:
        req.prompt = prompt
    return req


@dataclass
class RunningCluster:
    cluster: LocalCluster
    channel: grpc.Channel
    stub: generation_pb2_grpc.GenerationStub
    store: KVStoreClient

    @property
    def settings(self) -> ClusterSettings:
        return self.cluster.settings

    def generate(self, req: generation_pb2.GenerateRequest, timeout: float = 60) -> Result:
        return collect(self.stub.Generate(req, timeout=timeout))


@pytest.fixture(scope="session", params=["grpc", "shm"])
def split_cluster(request: pytest.FixtureRequest, tiny_llama_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """2 prefill + 2 decode workers, KV moving over the transport of the param."""
    settings = cluster_settings(tiny_llama_dir, transport=request.param)
    with running_cluster(settings, tmp_path_factory.mktemp(f"cluster-{request.param}")) as rc:
        yield rc


@contextmanager
def running_cluster(settings: ClusterSettings, tmp: Path) -> Iterator[RunningCluster]:
    """The cluster of ``settings`` started, with a client channel and a store client."""
    cluster = start_cluster(settings, tmp)
    channel = grpc.insecure_channel(settings.gateway.address)
    store = KVStoreClient(settings.kvstore.address, settings.transfer,
                          metadata=call_metadata(settings))
    try:
        yield RunningCluster(cluster, channel, generation_pb2_grpc.GenerationStub(channel), store)
    finally:
        store.close()
        channel.close()
        cluster.stop()


def start_unlisted(rc: RunningCluster, role: str, endpoint: Endpoint,
                   tmp: Path) -> ServiceProcess:
    """A worker of ``role`` at ``endpoint``, which the gateway's config does not name (it
    joins through the registry); stopped with the cluster."""
    extra = copy.deepcopy(rc.settings)
    entries = getattr(extra, role)
    entries.append(endpoint)
    config = tmp / f"extra-{role}.yaml"
    extra.dump_yaml(config)
    index = len(entries) - 1
    svc = ServiceProcess(role, index, endpoint, spawn(role, index, config, tmp))
    rc.cluster.services.append(svc)
    rc.cluster._wait_ready(svc)
    return svc


def metric(port: int, pattern: str) -> float:
    """The value of the series matching ``pattern`` (a regex of the whole name and
    labels) on the /metrics of ``port``; 0 when there is none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^" + pattern + r" ([0-9.e+]+)$", text, re.M)
    return float(m[1]) if m else 0.0
