"""The engine on CUDA: same greedy tokens as transformers on the CPU; KV hand-off on GPU."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from services.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from services.engine.kv_cache import host_rows
from tests.fixtures.models import hf_greedy


@pytest.fixture(autouse=True)
def exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(4, 70))] for _ in range(n)]


FAST = dict(attention_backend="triton", enforce_eager=False)  # Triton kernels + CUDA graphs
REFERENCE = dict(attention_backend="torch", enforce_eager=True)


@pytest.mark.parametrize("path", [FAST, REFERENCE], ids=["triton-graphs", "torch-eager"])
@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_cuda_float32_matches_transformers(family: str, path: dict,
                                           request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(family)
    prompts = _prompts(8, seed=1)
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_kv_blocks=128,
              use_tqdm=False, **path)
    got = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [g["token_ids"] for g in got] == hf_greedy(model_dir, prompts, 12)


def _payloads(kind: str, blocks: list, block_nbytes: int) -> list:
    """What a decode engine gets: copies, the exported views (pinned), or the rows of
    one pinned buffer (as the decode worker stages them)."""
    if kind == "bytes":
        return [bytes(b.payload) for b in blocks]
    if kind == "exported":
        return [b.payload for b in blocks]
    rows = host_rows(len(blocks), block_nbytes, pinned=True)
    for row, b in zip(rows, blocks, strict=True):
        row.numpy()[:] = b.payload
    return rows


def _one_engine_tokens(cfg: dict, prompt: list[int], params: SamplingParams) -> list[int]:
    """The tokens one engine generates for ``prompt``: the reference of a split run."""
    engine = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    engine.add_request("r", prompt, params)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    return tokens


def _split_run(cfg: dict, prompt: list[int], params: SamplingParams, kind: str) -> list[int]:
    """Prefill (first token) in one engine, the rest in another from its exported KV."""
    prefill = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    first_only = SamplingParams(**{**params.__dict__, "max_tokens": 1})
    prefill.add_request("r", prompt, first_only, export_kv=True)
    blocks, first = [], None
    while prefill.has_unfinished():
        for out in prefill.step():
            blocks += out.exported_blocks + ([out.tail_block] if out.tail_block else [])
            first = out.new_token_ids[0] if out.new_token_ids else first
    decode = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    decode.add_request("r", prompt, params, output_token_ids=[first],
                       kv_blocks=_payloads(kind, blocks, prefill.block_nbytes),
                       kv_num_tokens=len(prompt))
    got = [first]
    while decode.has_unfinished():
        got += [t for o in decode.step() for t in o.new_token_ids]
    return got


@pytest.mark.parametrize("path", [FAST, REFERENCE], ids=["triton-graphs", "torch-eager"])
@pytest.mark.parametrize("kind", ["bytes", "exported", "staged"])
def test_cuda_prefill_decode_split_bfloat16(kind: str, path: dict, tiny_llama_dir: Path) -> None:
    cfg = dict(model=str(tiny_llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=64,
               **path)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompt = _prompts(1, seed=2)[0] + [7] * 40
    want = _one_engine_tokens(cfg, prompt, params)

    assert _split_run(cfg, prompt, params, kind) == want


def test_dummy_qwen3_0_6b_generates_in_bfloat16() -> None:
    llm = LLM(model="dummy:qwen3-0.6b", device="cuda", dtype="bfloat16", num_kv_blocks=256,
              max_model_len=1024, use_tqdm=False)
    out = llm.generate([[1, 2, 3, 4] * 32] * 4, SamplingParams(max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o["token_ids"]) == 8 for o in out)


def test_cuda_export_is_async_and_outlives_block_reuse(tiny_llama_dir: Path) -> None:
    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cuda", num_kv_blocks=16),
                  use_tqdm=False)
    kv = e.kv_cache
    kv.tensor.copy_(torch.randn_like(kv.tensor))
    ids = [5, 1, 9]
    want = kv.as_bytes[ids].cpu()
    payloads, wait = kv.export_blocks_async(ids)
    assert wait is not None
    kv.tensor[ids] = 0  # the next step reuses the blocks at once
    wait()
    got = torch.stack([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads])
    assert torch.equal(got, want)
    assert all(len(p) == e.block_nbytes for p in payloads)
    assert torch.frombuffer(payloads[0], dtype=torch.uint8).is_pinned()


def test_cuda_import_from_every_kind_of_buffer(tiny_llama_dir: Path) -> None:
    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cuda", num_kv_blocks=32),
                  use_tqdm=False)
    kv = e.kv_cache
    kv.tensor.copy_(torch.randn_like(kv.tensor))
    src = list(range(8))
    exported = kv.export_blocks(src)
    rows = host_rows(8, e.block_nbytes, pinned=True)
    assert rows[0].is_pinned()
    for row, p in zip(rows, exported, strict=True):
        row.numpy()[:] = p
    items = [
        (20, rows[0]), (21, rows[1]), (22, rows[2]),  # one adjacent pinned run
        (30, rows[5]),  # a pinned row alone
        (23, exported[3]),  # exported views: pinned, one buffer each
        (24, bytes(exported[4])),  # pageable: staged
        (25, kv.as_bytes[6].clone()),  # already on the device
        (26, torch.frombuffer(bytearray(exported[7]), dtype=torch.uint8)),
    ]
    kv.import_blocks(items)
    del rows, items  # the copies may still be reading: the cache keeps them alive
    for dst, s in ((20, 0), (21, 1), (22, 2), (30, 5), (23, 3), (24, 4), (25, 6), (26, 7)):
        assert torch.equal(kv.tensor[dst], kv.tensor[s]), (dst, s)


def test_cuda_swap_out_and_resume(tiny_llama_dir: Path) -> None:
    cfg = dict(model=str(tiny_llama_dir), device="cuda", num_kv_blocks=64)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0] + [9] * 30
    want = _one_engine_tokens(cfg, prompt, params)
    a = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    a.add_request("r", prompt, params)
    got = []
    for _ in range(4):
        got += [t for o in a.step() for t in o.new_token_ids]
    swapped = a.swap_out("r")
    a.add_request("other", _prompts(1, seed=6)[0] * 2, params)  # reuses the freed blocks
    a.step()
    b = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    b.add_request("r", prompt, params, output_token_ids=swapped.output_token_ids,
                  kv_blocks=[blk.payload for blk in swapped.blocks],
                  kv_num_tokens=swapped.kv_num_tokens)
    while b.has_unfinished():
        got += [t for o in b.step() for t in o.new_token_ids]
    assert got == want


@pytest.mark.parametrize("path", [FAST, REFERENCE], ids=["triton-graphs", "torch-eager"])
def test_cuda_swap_preemption_matches_transformers(path: dict, tiny_qwen3_dir: Path) -> None:
    """A KV cache too small for the batch: preempted sequences swap their KV to host
    memory and back (the blocks they freed are reused in between); float32 greedy
    tokens equal transformers' and no token's KV is computed twice."""
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(20 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model=str(tiny_qwen3_dir), device="cuda", dtype="float32",
                                    num_kv_blocks=12, enable_prefix_caching=False, **path),
                       use_tqdm=False)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    st = engine.stats()
    assert st.num_preemptions > 0 and st.num_swapped_out == st.num_preemptions
    assert st.num_computed_tokens == sum(len(p) + params.max_tokens - 1 for p in prompts)
    assert [out[f"r{i}"] for i in range(len(prompts))] == hf_greedy(tiny_qwen3_dir, prompts, 30)


def _greedy_tokens(engine_kwargs: dict, prompts: list[list[int]], n: int) -> list[list[int]]:
    llm = LLM(use_tqdm=False, **engine_kwargs)
    out = llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o["token_ids"] for o in out]


def test_cuda_graph_replay_equals_eager(tiny_qwen3_dir: Path) -> None:
    """Batches of 1..13 decodes (padded to graph buckets) give the eager tokens."""
    cfg = dict(model=str(tiny_qwen3_dir), device="cuda", dtype="bfloat16", num_kv_blocks=256,
               max_num_seqs=16, attention_backend="triton")
    prompts = _prompts(13, seed=7)
    eager = _greedy_tokens({**cfg, "enforce_eager": True}, prompts, 20)
    graphs = _greedy_tokens({**cfg, "enforce_eager": False}, prompts, 20)
    assert graphs == eager


def test_triton_backend_equals_torch_backend_in_float32(tiny_llama_dir: Path) -> None:
    cfg = dict(model=str(tiny_llama_dir), device="cuda", dtype="float32", num_kv_blocks=256,
               max_num_batched_tokens=64)  # chunked prefill mixed with decodes
    prompts = _prompts(10, seed=11)
    want = _greedy_tokens({**cfg, **REFERENCE}, prompts, 16)
    assert _greedy_tokens({**cfg, **FAST}, prompts, 16) == want


def test_seeded_sampling_split_equals_one_engine_on_cuda(tiny_llama_dir: Path) -> None:
    cfg = dict(model=str(tiny_llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=64,
               **FAST)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=42,
                            ignore_eos=True)
    prompt = _prompts(1, seed=9)[0] + [3] * 20
    want = _one_engine_tokens(cfg, prompt, params)
    assert _split_run(cfg, prompt, params, "exported") == want


def test_8k_prompt_at_default_memory_settings() -> None:
    """The KV cache is sized after a profiling step: an 8K-token prompt in one step
    (max_num_batched_tokens 8192) at gpu_memory_utilization 0.9 does not run out of memory."""
    engine = LLMEngine(EngineConfig(model="dummy:llama-3.1-8b", device="cuda",
                                    dtype="bfloat16", max_model_len=8192 + 16,
                                    max_num_batched_tokens=8192, **FAST), use_tqdm=False)
    engine.add_request("long", list(range(1, 8193)), SamplingParams(max_tokens=2,
                                                                    ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert len(tokens) == 2
    assert engine.stats().num_steps == 2


def test_graphs_capture_while_dead_cycles_hold_an_old_engine(tiny_llama_dir: Path) -> None:
    """An old engine kept only by a reference cycle, and a collection due at nearly every
    allocation: freed inside a capture, its graphs and memory would break it. The new
    engine collects before it captures and keeps the collector off while it does."""
    cfg = dict(model=str(tiny_llama_dir), device="cuda", num_kv_blocks=32, **FAST)
    cycle: dict = {"engine": LLMEngine(EngineConfig(**cfg), use_tqdm=False)}
    cycle["self"] = cycle
    del cycle
    thresholds = gc.get_threshold()
    gc.set_threshold(1)
    try:
        engine = LLMEngine(EngineConfig(**cfg), use_tqdm=False)
    finally:
        gc.set_threshold(*thresholds)
    engine.add_request("r", [5, 9, 13], SamplingParams(max_tokens=4, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert len(tokens) == 4
