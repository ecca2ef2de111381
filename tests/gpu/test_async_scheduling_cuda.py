"""Async scheduling on CUDA (Triton kernels, CUDA graphs): the same greedy tokens
as synchronous steps, with decodes fed from the device, early stops, swap
preemption and KV export while the next step runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.engine import EngineConfig, LLMEngine, SamplingParams
from tests.fixtures.models import hf_greedy

FAST = dict(attention_backend="triton", enforce_eager=False)


@pytest.fixture(autouse=True)
def exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _engine(overlap: bool, **cfg: object) -> LLMEngine:
    engine = LLMEngine(EngineConfig(device="cuda", async_scheduling=overlap, **FAST, **cfg),
                       use_tqdm=False)
    assert engine.runner.graphs is not None
    engine.fed_from_device = 0
    feed = engine.runner.inputs.feed_from_device

    def counting(rows: list[int], src: list[int], ids: torch.Tensor) -> None:
        engine.fed_from_device += len(rows)
        feed(rows, src, ids)

    engine.runner.inputs.feed_from_device = counting
    return engine


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
         ) -> tuple[list[list[int]], list[str | None]]:
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons: dict[str, str | None] = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        engine.check_invariants()
    assert engine.stats().num_free_blocks == engine.num_kv_blocks
    return [tokens[f"r{i}"] for i in range(len(prompts))], [reasons.get(f"r{i}") for i in
                                                             range(len(prompts))]


def _mixed(seed: int, n: int, vocab: int) -> list[list[int]]:
    """Lengths from a few tokens to past the chunk graphs (512): every layout runs."""
    rng = random.Random(seed)
    lengths = [rng.choice([3, 17, 40, 90, 200, 700]) + rng.randrange(8) for _ in range(n)]
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_async_equals_sync_float32_with_stops(family: str,
                                              request: pytest.FixtureRequest) -> None:
    """Mixed prompt lengths; some requests end by max_tokens, some on a stop token
    (the next step was already launched for them: its token is dropped)."""
    model = str(request.getfixturevalue(family))
    cfg = dict(model=model, dtype="float32", num_kv_blocks=1024, max_num_seqs=16,
               max_model_len=1024)
    prompts = _mixed(1, 14, 500)
    lengths = [SamplingParams(max_tokens=1 + (7 * i) % 24, ignore_eos=True)
               for i in range(len(prompts))]
    plain, _ = _run(_engine(False, **cfg), prompts, lengths)
    # stop on a token each of half the requests produces a few tokens in
    params = [SamplingParams(max_tokens=24, stop_token_ids=(toks[min(3, len(toks) - 1)],))
              if i % 2 else sp for i, (sp, toks) in enumerate(zip(lengths, plain, strict=True))]
    sync = _engine(False, **cfg)
    want = _run(sync, prompts, params)
    overlap = _engine(True, **cfg)
    assert _run(overlap, prompts, params) == want
    assert "stop" in want[1] and "length" in want[1]
    assert overlap.fed_from_device > 0 and sync.fed_from_device == 0
    assert overlap.stats().num_discarded_tokens > 0 == sync.stats().num_discarded_tokens


def test_async_equals_sync_bfloat16_dummy_qwen3() -> None:
    """A real shape in bf16: only max_tokens finishes (known ahead), so both runs
    schedule the same steps and the tokens are bit-for-bit the same."""
    cfg = dict(model="dummy:qwen3-0.6b", dtype="bfloat16", num_kv_blocks=2048,
               max_num_seqs=32, max_model_len=1024)
    prompts = _mixed(2, 40, 150_000)
    params = [SamplingParams(max_tokens=4 + (5 * i) % 40, ignore_eos=True)
              for i in range(len(prompts))]
    want = _run(_engine(False, **cfg), prompts, params)
    overlap = _engine(True, **cfg)
    assert _run(overlap, prompts, params) == want
    assert overlap.fed_from_device > 0 and overlap.stats().num_discarded_tokens == 0


def test_async_swap_preemption_matches_transformers(tiny_qwen3_dir: Path) -> None:
    """A KV cache too small for the batch: the step that would preempt waits for
    the one in flight; the swapped sequences resume with their KV, tokens equal
    transformers' and no token's KV is computed twice."""
    prompts = [[random.Random(i).randrange(3, 500) for _ in range(20 + i)] for i in range(6)]
    params = [SamplingParams(max_tokens=30, ignore_eos=True)] * len(prompts)
    engine = _engine(True, model=str(tiny_qwen3_dir), dtype="float32", num_kv_blocks=12,
                     enable_prefix_caching=False)
    got, _ = _run(engine, prompts, params)
    st = engine.stats()
    assert st.num_preemptions > 0 and st.num_swapped_out == st.num_preemptions
    assert st.num_computed_tokens == sum(len(p) + 30 - 1 for p in prompts)
    assert got == hf_greedy(tiny_qwen3_dir, prompts, 30)
    assert engine.fed_from_device > 0


def test_async_split_prefill_decode_exports_committed_blocks(tiny_llama_dir: Path) -> None:
    """A prefill engine exports blocks while its next step runs (chunked prompts
    beside each other); a decode engine continues from them: transformers' tokens."""
    cfg = dict(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256,
               max_num_batched_tokens=48)
    prompts = _mixed(3, 4, 500)
    prefill = _engine(True, **cfg)
    blocks: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, SamplingParams(max_tokens=1, ignore_eos=True),
                            export_kv=True)
    while prefill.has_unfinished():
        for o in prefill.step():
            blocks[o.request_id] += o.exported_blocks + ([o.tail_block] if o.tail_block else [])
            if o.new_token_ids:
                first[o.request_id] = o.new_token_ids[0]
    decode = _engine(True, **cfg)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        decode.add_request(rid, p, params, output_token_ids=[first[rid]],
                           kv_blocks=[b.payload for b in blocks[rid]], kv_num_tokens=len(p))
    got = {rid: [first[rid]] for rid in first}
    while decode.has_unfinished():
        for o in decode.step():
            got[o.request_id] += o.new_token_ids
    assert [got[f"r{i}"] for i in range(len(prompts))] == hf_greedy(tiny_llama_dir, prompts, 10)
    assert decode.stats().num_computed_tokens == len(prompts) * (params.max_tokens - 1)


def test_async_profile_times_the_device(tiny_llama_dir: Path) -> None:
    engine = _engine(True, model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=128)
    engine.runner.profiler.enabled = True
    _run(engine, _mixed(4, 6, 500), [SamplingParams(max_tokens=16, ignore_eos=True)] * 6)
    prof = engine.runner.profiler
    assert prof.device_seconds["device busy"] > 0
    assert "host hidden" in prof.table(engine.stats().num_steps)


def test_export_after_an_event_outlives_block_reuse(tiny_llama_dir: Path) -> None:
    """An export gathered after the step's end event (not after the step launched
    ahead): work queued after it, a block reuse included, waits for the gather."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cuda",
                                    num_kv_blocks=16), use_tqdm=False)
    kv = engine.kv_cache
    kv.tensor.copy_(torch.randn_like(kv.tensor))
    ids = [5, 1, 9]
    want = kv.as_bytes[ids].cpu()
    step_end = torch.cuda.Event()
    step_end.record()
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # the step launched ahead: long, and touching other memory
        big = big @ big / 64
    payloads, wait = kv.export_blocks_async(ids, after=step_end)
    kv.tensor[ids] = 0  # a later step reuses the blocks at once
    wait()
    got = torch.stack([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads])
    assert torch.equal(got, want)
    torch.cuda.synchronize()
    assert not kv.as_bytes[ids].any()
