"""The engine on CUDA: same greedy tokens as transformers on the CPU; KV hand-off on GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from tests.fixtures.models import hf_greedy


@pytest.fixture(autouse=True)
def exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(4, 70))] for _ in range(n)]


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_cuda_float32_matches_transformers(family: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(family)
    prompts = _prompts(8, seed=1)
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_kv_blocks=128,
              use_tqdm=False)
    got = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [g["token_ids"] for g in got] == hf_greedy(model_dir, prompts, 12)


def test_cuda_prefill_decode_split_bfloat16(tiny_llama_dir: Path) -> None:
    cfg = dict(model=str(tiny_llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=64)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompt = _prompts(1, seed=2)[0] + [7] * 40
    one = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    one.add_request("r", prompt, params)
    want = []
    while one.has_unfinished():
        want += [t for o in one.step() for t in o.new_token_ids]

    prefill = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    prefill.add_request("r", prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                        export_kv=True)
    blocks, first = [], None
    while prefill.has_unfinished():
        for out in prefill.step():
            blocks += out.exported_blocks + ([out.tail_block] if out.tail_block else [])
            first = out.new_token_ids[0] if out.new_token_ids else first
    decode = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    decode.add_request("r", prompt, params, output_token_ids=[first],
                       kv_blocks=[bytes(b.payload) for b in blocks], kv_num_tokens=len(prompt))
    got = [first]
    while decode.has_unfinished():
        got += [t for o in decode.step() for t in o.new_token_ids]
    assert got == want


def test_dummy_qwen3_0_6b_generates_in_bfloat16() -> None:
    llm = LLM(model="dummy:qwen3-0.6b", device="cuda", dtype="bfloat16", num_kv_blocks=256,
              max_model_len=1024, use_tqdm=False)
    out = llm.generate([[1, 2, 3, 4] * 32] * 4, SamplingParams(max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o["token_ids"]) == 8 for o in out)
