"""The split path with workers on the GPU: same tokens as one CUDA engine."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from services.engine import LLM, SamplingParams
from splitserve.v1 import generation_pb2_grpc
from tests.integration.conftest import cluster_settings, collect, request, start_cluster


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_split_path_on_cuda(transport: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = cluster_settings(tiny_llama_dir, transport=transport, prefill=1, decode=1)
    settings.model.device = "cuda"
    settings.model.dtype = "float32"
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 120))] for _ in range(6)]
    llm = LLM(model=str(tiny_llama_dir), device="cuda", dtype="float32", num_kv_blocks=256,
              max_model_len=512, use_tqdm=False)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [llm.generate([p], params, use_tqdm=False)[0]["token_ids"] for p in prompts]
    del llm
    cluster = start_cluster(settings, tmp_path)
    try:
        with grpc.insecure_channel(settings.gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            got = [collect(stub.Generate(request(p, max_tokens=10), timeout=60)).tokens
                   for p in prompts]
    finally:
        cluster.stop()
    assert got == want
