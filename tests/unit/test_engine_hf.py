"""Greedy tokens identical to HF transformers (CPU, float32, tiny random models)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.engine import LLM
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams
from tests.fixtures.models import EOS, hf_greedy, make_tiny_model

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(model: Path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), **kw), use_tqdm=False)


def run(e: LLMEngine, reqs: dict[str, list[int]], params=GREEDY) -> dict[str, list[int]]:
    out = {rid: [] for rid in reqs}
    for rid, p in reqs.items():
        e.add_request(rid, p, params)
    while e.has_unfinished():
        for o in e.step():
            out[o.request_id] += o.new_token_ids
        e.check_invariants()
    assert e.stats().num_free_blocks == e.num_kv_blocks
    return out


@pytest.fixture(scope="module")
def model_dirs(tiny_llama_dir, tiny_llama3_dir, tiny_qwen2_dir, tiny_qwen3_dir) -> dict[str, Path]:
    return {
        "llama": tiny_llama_dir,
        "llama3": tiny_llama3_dir,
        "qwen2": tiny_qwen2_dir,
        "qwen3": tiny_qwen3_dir,
    }


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3"])
def test_single_prompts(model_dirs: dict[str, Path], family: str) -> None:
    d = model_dirs[family]
    ps = prompts(3, 1, 40, seed=1)
    ref = hf_greedy(d, ps, GREEDY.max_tokens)
    e = engine(d, num_kv_blocks=32)
    for i, p in enumerate(ps):  # one at a time
        assert run(e, {f"r{i}": p})[f"r{i}"] == ref[i], f"prompt {i}"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_mixed_lengths(model_dirs: dict[str, Path], family: str) -> None:
    d = model_dirs[family]
    ps = prompts(10, 1, 120, seed=2)
    ref = hf_greedy(d, ps, GREEDY.max_tokens)
    out = run(engine(d, num_kv_blocks=128), {f"r{i}": p for i, p in enumerate(ps)})
    assert [out[f"r{i}"] for i in range(len(ps))] == ref


def test_warm_up_step_leaves_no_trace(tiny_llama_dir: Path) -> None:
    """The start-up warm-up step (run on CUDA) writes K/V into blocks no request
    holds: later requests still get the reference tokens and the books balance."""
    ps = prompts(3, 5, 60, seed=4)
    ref = hf_greedy(tiny_llama_dir, ps, GREEDY.max_tokens)
    e = engine(tiny_llama_dir, num_kv_blocks=64, max_num_batched_tokens=64)
    e.runner._warm_up()
    out = run(e, {f"r{i}": p for i, p in enumerate(ps)})
    assert [out[f"r{i}"] for i in range(len(ps))] == ref


def test_chunked_prefill(tiny_llama_dir: Path) -> None:
    ps = prompts(4, 40, 90, seed=3)
    ref = hf_greedy(tiny_llama_dir, ps, GREEDY.max_tokens)
    e = engine(tiny_llama_dir, num_kv_blocks=64, max_num_batched_tokens=7)
    out = run(e, {f"r{i}": p for i, p in enumerate(ps)})
    assert [out[f"r{i}"] for i in range(len(ps))] == ref
    assert e.stats().num_steps >= sum(len(p) for p in ps) // 7  # prompts were split


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption(tiny_qwen3_dir: Path, mode: str) -> None:
    """A KV cache too small for the batch preempts; either way the tokens equal the
    reference. Swapped sequences come back with their KV: every token's KV is
    computed exactly once (the prompt, then each output but the last)."""
    ps = prompts(6, 20, 35, seed=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = hf_greedy(tiny_qwen3_dir, ps, params.max_tokens)
    e = engine(tiny_qwen3_dir, num_kv_blocks=12,  # 192 token slots for ~6 * 60 tokens
               preemption_mode=mode, enable_prefix_caching=False)
    out = run(e, {f"r{i}": p for i, p in enumerate(ps)}, params)
    assert e.stats().num_preemptions > 0
    assert [out[f"r{i}"] for i in range(len(ps))] == ref
    once = sum(len(p) + params.max_tokens - 1 for p in ps)
    if mode == "swap":
        assert e.num_swapped_out == e.stats().num_preemptions
        assert e.stats().num_computed_tokens == once
    else:
        assert e.stats().num_computed_tokens > once


def test_swap_space_bounds_swapped_kv(tiny_qwen3_dir: Path) -> None:
    """With no swap space, swap preemption falls back to recomputing."""
    ps = prompts(6, 20, 35, seed=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    e = engine(tiny_qwen3_dir, num_kv_blocks=12, swap_space_gb=0.0)
    run(e, {f"r{i}": p for i, p in enumerate(ps)}, params)
    assert e.stats().num_preemptions > 0 and e.num_swapped_out == 0


def test_sharded_checkpoint_and_mistral_arch(tmp_path: Path) -> None:
    """Mistral is Llama-shaped; a sharded save goes through the index file."""
    import transformers

    d = make_tiny_model(tmp_path / "m", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    cfg = transformers.MistralConfig(**{**model.config.to_dict(), "sliding_window": None})
    mistral = transformers.MistralForCausalLM(cfg)
    mistral.load_state_dict(model.state_dict())
    out_dir = tmp_path / "mistral"
    mistral.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="100KB")
    assert (out_dir / "model.safetensors.index.json").is_file()
    ps = prompts(2, 5, 30, seed=5)
    ref = hf_greedy(d, ps, GREEDY.max_tokens)
    e = engine(out_dir, num_kv_blocks=16)
    assert e.model_config.architecture == "MistralForCausalLM"
    out = run(e, {"a": ps[0], "b": ps[1]})
    assert [out["a"], out["b"]] == ref


def test_stop_token_and_max_model_len(tiny_llama_dir: Path) -> None:
    p = prompts(1, 10, 10, seed=6)[0]
    ref = hf_greedy(tiny_llama_dir, [p], 10)[0]
    e = engine(tiny_llama_dir, num_kv_blocks=16, max_model_len=16)
    stop = ref[3]
    first = ref.index(stop)
    e.add_request("s", p, SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    e.add_request("m", p, SamplingParams(max_tokens=10, ignore_eos=True))
    res: dict[str, list] = {"s": [], "m": []}
    reasons = {}
    while e.has_unfinished():
        for o in e.step():
            res[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert res["s"] == ref[: first + 1] and reasons["s"] == "stop"
    assert res["m"] == ref[:6] and reasons["m"] == "length"  # 10 + 6 = max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        e.add_request("x", list(range(17)), GREEDY)


def test_llm_offline_api_with_text(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), use_tqdm=False, num_kv_blocks=32)
    outs = llm.generate(["hello world", [5, 6, 7]], GREEDY, use_tqdm=False)
    ids = llm.encode("hello world")
    assert ids == list(b"hello world")
    assert outs[0]["token_ids"] == hf_greedy(tiny_llama_dir, [ids], 10)[0]
    assert isinstance(outs[0]["text"], str) and outs[1]["finish_reason"] == "length"
    # eos ends a request unless ignore_eos
    assert EOS == 257
