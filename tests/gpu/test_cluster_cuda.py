"""The split path with workers on the GPU: same tokens as one CUDA engine."""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import pytest

from services.engine import LLM, SamplingParams
from splitserve.v1 import generation_pb2_grpc
from tests.integration.conftest import (
    cluster_settings,
    collect,
    metric,
    request,
    start_cluster,
)


@pytest.mark.parametrize("transport", ["grpc", "shm", "cuda_ipc"])
def test_split_path_on_cuda(transport: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = cluster_settings(tiny_llama_dir, transport=transport, prefill=1, decode=1)
    settings.model.device = "cuda"
    settings.model.dtype = "float32"
    if transport == "cuda_ipc":  # the store keeps a gpu tier the workers map
        settings.kvstore.tiers = [{"kind": "gpu", "bytes": 256 << 20, "device": "cuda:0"},
                                  {"kind": "cpu", "bytes": 256 << 20}]
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
        moved = metric(settings.kvstore.http_port,
                       f'splitserve_kvstore_transfer_bytes_total{{direction="put",'
                       f'transport="{transport}"}}')
        pins = _pins_after_release(settings.kvstore.http_port)
    finally:
        cluster.stop()
    assert got == want
    assert pins == 0
    assert moved > 0  # the blocks went through the transport asked for


def _pins_after_release(port: int) -> float:
    """The store's pins once the workers have let go (they release after the stream)."""
    deadline = time.monotonic() + 5
    while (pins := metric(port, "splitserve_kvstore_pins")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pins
