"""Async scheduling forced on, on the CPU: the same tokens as transformers and as
synchronous steps (the bookkeeping is the one a GPU runs; here each step simply
runs as it is launched)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams
from tests.fixtures.models import hf_greedy
from tests.unit.test_engine_kv import drain, token_ids

BS = 16
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def engine(model: Path, overlap: bool = True, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    e = LLMEngine(EngineConfig(model=str(model), async_scheduling=overlap, **kw), use_tqdm=False)
    e.fed_from_device = 0
    feed = e.runner.inputs.feed_from_device

    def counting(rows: list[int], src: list[int], ids: object) -> None:
        e.fed_from_device += len(rows)
        feed(rows, src, ids)

    e.runner.inputs.feed_from_device = counting
    return e


def prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(e: LLMEngine, ps: list[list[int]], params=GREEDY) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(ps)
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        e.add_request(f"r{i}", p, sp)
    outs = drain(e)
    assert e.stats().num_free_blocks == e.num_kv_blocks
    return [token_ids(outs[f"r{i}"]) for i in range(len(ps))]


@pytest.mark.parametrize("kw, ps", [
    ({}, prompts(10, 1, 120, seed=2)),
    ({"max_num_batched_tokens": 7}, prompts(4, 40, 90, seed=3)),
    ({"max_num_seqs": 3}, prompts(7, 1, 60, seed=5)),
], ids=["batched", "chunked", "few-seats"])
def test_greedy_tokens_equal_transformers(tiny_llama_dir: Path, kw: dict,
                                         ps: list[list[int]]) -> None:
    e = engine(tiny_llama_dir, **kw)
    assert run(e, ps) == hf_greedy(tiny_llama_dir, ps, GREEDY.max_tokens)
    assert e.fed_from_device > 0  # decodes did take their token from the step before
    st = e.stats()
    assert st.num_discarded_tokens == 0  # max_tokens is known ahead: no step past it
    assert st.num_generated_tokens == GREEDY.max_tokens * len(ps)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_falls_back_and_stays_exact(tiny_qwen3_dir: Path, mode: str) -> None:
    ps = prompts(6, 20, 35, seed=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    e = engine(tiny_qwen3_dir, num_kv_blocks=12, preemption_mode=mode,
               enable_prefix_caching=False)
    assert run(e, ps, params) == hf_greedy(tiny_qwen3_dir, ps, params.max_tokens)
    st = e.stats()
    assert st.num_preemptions > 0 and e.fed_from_device > 0
    if mode == "swap":  # every token's KV computed once: no in-flight work was lost
        assert st.num_computed_tokens == sum(len(p) + params.max_tokens - 1 for p in ps)


def test_prefix_cache_hits_under_overlap(tiny_llama_dir: Path) -> None:
    shared = prompts(1, 3 * BS, 3 * BS, seed=8)[0]
    ps = [shared + p for p in prompts(6, 1, 20, seed=9)]
    e = engine(tiny_llama_dir)
    e.add_request("first", shared + [1], GREEDY)
    drain(e)
    assert run(e, ps) == hf_greedy(tiny_llama_dir, ps, GREEDY.max_tokens)
    assert e.stats().num_prefix_hit_tokens >= len(ps) * 3 * BS


def test_stops_drop_the_token_after_them(tiny_llama_dir: Path) -> None:
    """A request that stops on a token was already in the next step: that step's
    token for it is dropped, never reported; the outputs equal synchronous steps."""
    ps = prompts(6, 5, 40, seed=6)
    ref = hf_greedy(tiny_llama_dir, ps, 12)
    params = [SamplingParams(max_tokens=12, stop_token_ids=(r[2 + i % 4],)) for i, r in
              enumerate(ref)]
    sync, overlap = engine(tiny_llama_dir, overlap=False), engine(tiny_llama_dir)
    want = run(sync, ps, params)
    stops = [p.stop_token_ids[0] for p in params]
    assert want == [r[: r.index(stop) + 1] for r, stop in zip(ref, stops, strict=True)]
    assert run(overlap, ps, params) == want
    assert overlap.stats().num_discarded_tokens > 0 == sync.stats().num_discarded_tokens
    assert overlap.stats().num_generated_tokens == sum(len(w) for w in want)


def test_max_model_len_finish(tiny_llama_dir: Path) -> None:
    p = prompts(1, 10, 10, seed=6)[0]
    e = engine(tiny_llama_dir, max_model_len=16)
    got = run(e, [p], SamplingParams(max_tokens=10, ignore_eos=True))
    assert got == [hf_greedy(tiny_llama_dir, [p], 6)[0]]
    assert e.stats().num_discarded_tokens == 0


def test_seeded_sampling_equals_synchronous_steps(tiny_llama_dir: Path) -> None:
    ps = prompts(5, 3, 50, seed=10)
    params = [SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, top_k=50, seed=s,
                             ignore_eos=True) for s in range(len(ps))]
    want = run(engine(tiny_llama_dir, overlap=False), ps, params)
    assert run(engine(tiny_llama_dir, seed=3), ps, params) == want


def test_split_prefill_and_decode(tiny_qwen3_dir: Path) -> None:
    """Prefill with export_kv (chunked, blocks leave per chunk), decode from them: the
    exported blocks are the committed ones, the tokens those of transformers."""
    prompt = prompts(1, 5 * BS + 7, 5 * BS + 7, seed=3)[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a = engine(tiny_qwen3_dir, max_num_batched_tokens=24)
    a.add_request("other", prompts(1, 70, 70, seed=11)[0], GREEDY, export_kv=True)
    a.add_request("x", prompt, SamplingParams(max_tokens=1, ignore_eos=True), export_kv=True)
    outs = drain(a)["x"]
    assert a.stats().num_free_blocks == a.num_kv_blocks
    full = [b for o in outs for b in o.exported_blocks]
    tail = outs[-1].tail_block
    assert [b.block_hash for b in full] == a.block_hashes(prompt)
    assert tail is not None and tail.num_tokens == len(prompt) % BS
    first = outs[-1].new_token_ids[0]
    b = engine(tiny_qwen3_dir)
    b.add_request("x", prompt, params, output_token_ids=[first],
                  kv_blocks=[bytes(x.payload) for x in full + [tail]],
                  kv_num_tokens=len(prompt))
    got = [first] + token_ids(drain(b)["x"])
    assert got == hf_greedy(tiny_qwen3_dir, [prompt], params.max_tokens)[0]
    assert b.stats().num_computed_tokens == params.max_tokens - 1


def test_abort_and_swap_out_while_a_step_is_in_flight(tiny_llama_dir: Path) -> None:
    ps = prompts(3, 20, 40, seed=12)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    ref = hf_greedy(tiny_llama_dir, ps, params.max_tokens)
    e = engine(tiny_llama_dir)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    for i, p in enumerate(ps):
        e.add_request(f"r{i}", p, params)
    for _ in range(5):
        for o in e.step():
            got[o.request_id] += o.new_token_ids
    assert e._inflight is not None
    assert e.abort("r0")
    swapped = e.swap_out("r1")
    assert swapped is not None and swapped.output_token_ids == got["r1"]
    e.check_invariants()
    for rid, outs in drain(e).items():
        assert rid == "r2"
        got[rid] += token_ids(outs)
    assert got["r0"] == ref[0][: len(got["r0"])]
    assert got["r2"] == ref[2]
    other = engine(tiny_llama_dir)
    other.add_request("r1", ps[1], params, output_token_ids=swapped.output_token_ids,
                      kv_blocks=[b.payload for b in swapped.blocks],
                      kv_num_tokens=swapped.kv_num_tokens)
    rest = token_ids(drain(other)["r1"])
    assert swapped.output_token_ids + rest == ref[1]


def test_profile_shows_the_host_waiting(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir)
    e.runner.profiler.enabled = True
    run(e, prompts(2, 5, 20, seed=13))
    table = e.runner.profiler.table(e.stats().num_steps)
    assert all(name in table for name in ("schedule", "prepare", "forward", "wait"))


def test_agents_join_the_step_after_their_shared_prefix_is_computed(tiny_llama_dir: Path) -> None:
    """A long shared prompt computed in chunks: requests that arrive meanwhile wait for
    it, and join the step right after the one computing its last full block (the
    engine completes that step before scheduling), with the same tokens."""
    shared = prompts(1, 64, 64, seed=3)[0]
    ps = [shared + p for p in prompts(4, 5, 9, seed=4)]
    sync = run(engine(tiny_llama_dir, overlap=False, enable_prefix_caching=True), ps)
    e = engine(tiny_llama_dir, enable_prefix_caching=True, max_num_batched_tokens=32)
    e.add_request("r0", ps[0], GREEDY)
    first: dict[str, int] = {}
    steps = 0
    while e.has_unfinished():
        outs = e.step()
        steps += 1
        if steps == 1:  # the others arrive while the first chunk is in flight
            for i in range(1, len(ps)):
                e.add_request(f"r{i}", ps[i], GREEDY)
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, steps)
    # r0: chunks of 32, 32, then its tail in the step the others join (the 64 shared
    # tokens end with chunk 2); scheduled before chunk 2 was done, they came one later
    assert all(first[f"r{i}"] == first["r0"] for i in range(1, len(ps)))
    assert e.stats().num_prefix_hit_tokens >= 3 * 64
    e2 = engine(tiny_llama_dir, enable_prefix_caching=True, max_num_batched_tokens=32)
    assert run(e2, ps) == sync
