"""Prefix cache, KV export/import between engines, aborts, block layout and hashes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.engine.block_hash import HashContext, block_hashes
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.kv_cache import _runs, host_rows
from services.engine.outputs import ExportedBlock, StepOutput
from services.engine.sequence import SamplingParams
from tests.fixtures.models import hf_greedy

BS = 16
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def engine(model: Path, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(EngineConfig(model=str(model), **kw), use_tqdm=False)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 512) for _ in range(n)]


def drain(e: LLMEngine) -> dict[str, list[StepOutput]]:
    outs: dict[str, list[StepOutput]] = {}
    while e.has_unfinished():
        for o in e.step():
            outs.setdefault(o.request_id, []).append(o)
        e.check_invariants()
    return outs


def token_ids(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_prefix_cache_hits_and_saves_compute(tiny_llama_dir: Path) -> None:
    prefix = tokens(3 * BS, 1)
    ps = [prefix + tokens(5 + i, 10 + i) for i in range(4)]
    ref = hf_greedy(tiny_llama_dir, ps, GREEDY.max_tokens)
    e = engine(tiny_llama_dir)
    e.add_request("first", ps[0], GREEDY)
    first = drain(e)["first"]
    assert token_ids(first) == ref[0] and first[-1].num_cached_tokens == 0
    computed = e.stats().num_computed_tokens
    for i in range(1, 4):
        e.add_request(f"r{i}", ps[i], GREEDY)
    outs = drain(e)
    for i in range(1, 4):
        assert token_ids(outs[f"r{i}"]) == ref[i]
        assert outs[f"r{i}"][-1].num_cached_tokens == 3 * BS
    st = e.stats()
    new_tokens = sum(len(p) - 3 * BS for p in ps[1:]) + 3 * (GREEDY.max_tokens - 1)
    assert st.num_computed_tokens - computed == new_tokens
    assert st.num_prefix_hit_tokens == 3 * 3 * BS
    # the whole first request (prompt + output) is cached too: a follow-up turn hits
    turn2 = ps[0] + ref[0] + tokens(3, 99)
    e.add_request("turn2", turn2, GREEDY)
    out = drain(e)["turn2"]
    assert out[-1].num_cached_tokens == (len(ps[0]) + GREEDY.max_tokens - 1) // BS * BS
    assert token_ids(out) == hf_greedy(tiny_llama_dir, [turn2], GREEDY.max_tokens)[0]


def test_prefix_caching_can_be_disabled(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, enable_prefix_caching=False)
    p = tokens(40, 2)
    for rid in ("a", "b"):
        e.add_request(rid, p, GREEDY)
        assert drain(e)[rid][-1].num_cached_tokens == 0
    assert e.stats().num_prefix_hit_tokens == 0


def prefill(e: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, **kw):
    """A prefill worker: max_tokens=1 + export_kv. Returns (first token, full blocks,
    tail, number of steps that exported something)."""
    e.add_request(
        rid, prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}), export_kv=True, **kw
    )
    outs = drain(e)[rid]
    full = [b for o in outs for b in o.exported_blocks]
    tail = outs[-1].tail_block
    assert outs[-1].finished
    return token_ids(outs)[0], full, tail, sum(1 for o in outs if o.exported_blocks)


@pytest.mark.parametrize("prompt_len", [5 * BS + 7, 4 * BS])
def test_prefill_in_a_decode_in_b(tiny_qwen3_dir: Path, prompt_len: int) -> None:
    prompt = tokens(prompt_len, 3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = hf_greedy(tiny_qwen3_dir, [prompt], params.max_tokens)[0]
    a = engine(tiny_qwen3_dir, max_num_batched_tokens=24)  # chunked: blocks leave per chunk
    first, full, tail, export_steps = prefill(a, "x", prompt, params)
    assert export_steps > 1
    assert [b.block_index for b in full] == list(range(prompt_len // BS))
    assert [b.block_hash for b in full] == a.block_hashes(prompt)
    assert all(len(b.payload) == a.block_nbytes and b.num_tokens == BS for b in full)
    if prompt_len % BS:
        assert tail.num_tokens == prompt_len % BS and tail.block_hash is None
        assert tail.block_index == prompt_len // BS
    else:
        assert tail is None
    payloads = [b.payload for b in full] + ([tail.payload] if tail else [])
    # A frees and reuses its blocks: the payloads must stay valid
    a.add_request("other", tokens(4 * BS, 4), GREEDY)
    drain(a)

    b = engine(tiny_qwen3_dir)
    b.add_request(
        "x",
        prompt,
        params,
        output_token_ids=[first],
        kv_blocks=[bytes(p) for p in payloads],
        kv_num_tokens=prompt_len,
    )
    outs = drain(b)["x"]
    assert [first] + token_ids(outs) == ref
    st = b.stats()
    assert st.num_computed_tokens == params.max_tokens - 1  # no prompt recompute
    assert st.num_imported_tokens == prompt_len
    assert st.num_free_blocks == b.num_kv_blocks


def test_seeded_sampling_same_across_split(tiny_llama_dir: Path) -> None:
    prompt = tokens(50, 5)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    one = engine(tiny_llama_dir)
    one.add_request("noise", tokens(30, 6), SamplingParams(max_tokens=20, temperature=1.0))
    one.add_request("x", prompt, params)
    whole = token_ids(drain(one)["x"])
    again = engine(tiny_llama_dir, seed=7)
    again.add_request("x", prompt, params)
    assert token_ids(drain(again)["x"]) == whole
    a, b = engine(tiny_llama_dir), engine(tiny_llama_dir)
    first, full, tail, _ = prefill(a, "x", prompt, params)
    b.add_request(
        "x",
        prompt,
        params,
        output_token_ids=[first],
        kv_blocks=[x.payload for x in full] + [tail.payload],
        kv_num_tokens=len(prompt),
    )
    assert [first] + token_ids(drain(b)["x"]) == whole
    other = SamplingParams(**{**params.__dict__, "seed": 43})
    c = engine(tiny_llama_dir)
    c.add_request("x", prompt, other)
    assert token_ids(drain(c)["x"]) != whole


def test_prefill_with_prefix_blocks_from_elsewhere(tiny_llama_dir: Path) -> None:
    """A prefill worker hands in the store's prefix blocks and computes only the rest;
    those blocks are not exported again, the new ones are."""
    prefix = tokens(2 * BS, 7)
    p1, p2 = prefix + tokens(20, 8), prefix + tokens(25, 9)
    a = engine(tiny_llama_dir)
    _, full, _, _ = prefill(a, "one", p1, GREEDY)
    c = engine(tiny_llama_dir)
    first, full2, tail2, _ = prefill(
        c, "two", p2, GREEDY, kv_blocks=[b.payload for b in full[:2]], kv_num_tokens=2 * BS
    )
    assert first == hf_greedy(tiny_llama_dir, [p2], 1)[0][0]
    st = c.stats()
    assert st.num_imported_tokens == 2 * BS
    assert st.num_computed_tokens == len(p2) - 2 * BS
    assert [b.block_index for b in full2] == [2]
    assert full2[0].block_hash == c.block_hashes(p2)[2]
    assert tail2.num_tokens == len(p2) % BS


def test_import_prefix_blocks(tiny_qwen3_dir: Path) -> None:
    prefix = tokens(3 * BS, 10)
    a = engine(tiny_qwen3_dir)
    _, full, _, _ = prefill(a, "a", prefix + [1, 2, 3], GREEDY)
    d = engine(tiny_qwen3_dir)
    n = d.import_prefix_blocks([b.block_hash for b in full], [b.payload for b in full])
    assert n == 3 and d.stats().num_cached_blocks == 3
    assert d.import_prefix_blocks([full[0].block_hash], [full[0].payload]) == 0
    p = prefix + tokens(9, 11)
    d.add_request("x", p, GREEDY)
    outs = drain(d)["x"]
    assert outs[-1].num_cached_tokens == 3 * BS
    assert token_ids(outs) == hf_greedy(tiny_qwen3_dir, [p], GREEDY.max_tokens)[0]
    with pytest.raises(ValueError, match="bytes"):
        d.import_prefix_blocks([b"x" * 16], [b"short"])


def test_abort_everywhere_leaves_no_leak(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, num_kv_blocks=20, max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(6):
        e.add_request(f"r{i}", tokens(30, 20 + i), SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(3):
        e.step()
        e.check_invariants()
    running = [s.request_id for s in e.scheduler.running]
    waiting = [s.request_id for s in e.scheduler.waiting]
    assert running and waiting
    assert e.abort(running[0]) and e.abort(waiting[-1])
    assert not e.abort(running[0]) and not e.abort("unknown")
    e.check_invariants()
    outs = drain(e)
    assert running[0] not in outs or not outs[running[0]][-1].finished
    assert e.stats().num_aborted == 2 and e.stats().num_finished == 4
    assert e.stats().num_free_blocks == e.num_kv_blocks
    e.block_manager.check_invariants([])


def test_add_request_validation(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, num_kv_blocks=4)
    with pytest.raises(ValueError, match="outside"):
        e.add_request("a", [600], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        e.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="KV blocks"):
        e.add_request("a", tokens(60, 1), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="payload"):
        e.add_request("a", tokens(10, 1), GREEDY, kv_blocks=[], kv_num_tokens=5)
    with pytest.raises(ValueError, match="bytes"):
        e.add_request("a", tokens(10, 1), GREEDY, kv_blocks=[b"xx"], kv_num_tokens=5)
    with pytest.raises(ValueError, match="max_tokens"):
        e.add_request("a", [1, 2], SamplingParams(max_tokens=2), output_token_ids=[3, 4])
    e.add_request("a", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already"):
        e.add_request("a", [1, 2], GREEDY)


def test_block_major_layout_and_roundtrip(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, num_kv_blocks=8)
    kv = e.kv_cache
    mc = e.model_config
    assert kv.tensor.shape == (8, mc.num_layers, 2, BS, mc.num_kv_heads, mc.head_dim)
    kv.tensor.copy_(torch.randn_like(kv.tensor))
    payload = kv.export_block(3)
    assert len(payload) == e.block_nbytes
    assert bytes(payload) == kv.tensor[3].contiguous().numpy().tobytes()  # one contiguous span
    k3, v3 = kv.layer(1)
    assert k3.data_ptr() == kv.tensor[:, 1, 0].data_ptr()  # per-layer strided view
    kv.import_block(5, bytes(payload))
    assert torch.equal(kv.tensor[5], kv.tensor[3])
    kv.import_block(6, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    assert torch.equal(kv.tensor[6], kv.tensor[3])


def test_block_hash_same_across_processes(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir)
    prompt = tokens(3 * BS + 2, 12)
    _, full, _, _ = prefill(e, "x", prompt, GREEDY)
    ctx = e.hash_ctx
    assert ctx == HashContext(tiny_llama_dir.name, BS, "float32")
    code = (
        "import sys\n"
        "from services.engine.block_hash import HashContext, block_hashes\n"
        f"ctx = HashContext({ctx.model_id!r}, {ctx.block_size}, {ctx.dtype!r})\n"
        f"print(' '.join(h.hex() for h in block_hashes({prompt!r}, ctx)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root
    )
    assert res.stdout.split() == [b.block_hash.hex() for b in full]
    assert [b.block_hash for b in full] == block_hashes(prompt, ctx)


def test_swap_out_and_resume_elsewhere(tiny_llama_dir: Path) -> None:
    prompt = tokens(2 * BS + 5, 30)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    ref = hf_greedy(tiny_llama_dir, [prompt], params.max_tokens)[0]
    a = engine(tiny_llama_dir)
    a.add_request("x", prompt, params)
    got: list[int] = []
    for _ in range(6):
        for o in a.step():
            got += o.new_token_ids
    swapped = a.swap_out("x")
    assert a.swap_out("x") is None and not a.has_unfinished()
    assert a.stats().num_free_blocks == a.num_kv_blocks
    a.check_invariants()
    assert swapped.output_token_ids == got and len(got) == 6
    assert swapped.kv_num_tokens == len(prompt) + len(got) - 1
    assert [b.block_hash for b in swapped.blocks if b.block_hash] == a.block_hashes(prompt + got)[
        : swapped.kv_num_tokens // BS
    ]
    b = engine(tiny_llama_dir)
    b.add_request(
        "x",
        swapped.prompt_token_ids,
        swapped.params,
        output_token_ids=swapped.output_token_ids,
        kv_blocks=[blk.payload for blk in swapped.blocks],
        kv_num_tokens=swapped.kv_num_tokens,
    )
    rest = token_ids(drain(b)["x"])
    assert got + rest == ref
    assert b.stats().num_computed_tokens == params.max_tokens - len(got)


def test_exported_block_waits_once_on_first_read() -> None:
    calls: list[int] = []
    payload = memoryview(bytearray(8))
    b = ExportedBlock(2, b"h", payload, BS, wait=lambda: calls.append(1))
    assert calls == [] and b.block_index == 2 and b.num_tokens == BS
    assert b.payload is payload and calls == [1]
    assert b.payload is payload and calls == [1]
    assert "block_index=2" in repr(b)
    assert ExportedBlock(0, None, payload, 3).payload is payload  # no wait: ready


def test_runs_of_adjacent_rows() -> None:
    staged = torch.arange(5 * 4, dtype=torch.uint8).view(5, 4)
    rows = list(staged.unbind(0))
    other = torch.zeros(4, dtype=torch.uint8)
    runs = _runs([rows[0], rows[1], rows[3], rows[4], other, rows[2]])
    assert [start for start, _ in runs] == [0, 2, 4, 5]
    assert [tuple(run.shape) for _, run in runs] == [(2, 4), (2, 4), (1, 4), (1, 4)]
    assert runs[0][1].data_ptr() == staged.data_ptr()  # a view, not a copy
    assert torch.equal(runs[1][1], staged[3:5])


def test_import_from_host_rows_and_buffers(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, num_kv_blocks=12)
    kv = e.kv_cache
    kv.tensor.copy_(torch.randn_like(kv.tensor))
    payloads = kv.export_blocks([0, 1, 2, 3])
    rows = host_rows(4, e.block_nbytes, pinned=True)  # no CUDA here: plain memory
    for row, p in zip(rows, payloads, strict=True):
        row.copy_(torch.frombuffer(bytearray(p), dtype=torch.uint8))
    kv.import_blocks([(8, rows[0]), (5, rows[1]), (9, rows[3]), (4, bytes(payloads[2]))])
    for dst, src in ((8, 0), (5, 1), (9, 3), (4, 2)):
        assert torch.equal(kv.tensor[dst], kv.tensor[src])
    with pytest.raises(ValueError, match="bytes"):
        kv.import_blocks([(6, rows[0][:-1])])


def test_decode_from_staged_host_rows(tiny_qwen3_dir: Path) -> None:
    """The decode worker's path: blocks land in the rows of one host buffer."""
    prompt = tokens(3 * BS + 4, 40)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a = engine(tiny_qwen3_dir)
    first, full, tail, _ = prefill(a, "x", prompt, params)
    blocks = full + [tail]
    rows = host_rows(len(blocks), a.block_nbytes, pinned=False)
    for row, b in zip(rows, blocks, strict=True):
        row.numpy()[:] = b.payload
    b = engine(tiny_qwen3_dir)
    b.add_request("x", prompt, params, output_token_ids=[first], kv_blocks=rows,
                  kv_num_tokens=len(prompt))
    got = [first] + token_ids(drain(b)["x"])
    assert got == hf_greedy(tiny_qwen3_dir, [prompt], params.max_tokens)[0]
    assert b.stats().num_computed_tokens == params.max_tokens - 1


@pytest.mark.parametrize("cached_before", [True, False])
def test_kv_from_a_first_block_on_top_of_the_prefix_cache(tiny_qwen3_dir: Path,
                                                          cached_before: bool) -> None:
    """The KV connector hands in only the blocks the engine lacks (kv_first_block): the
    cached ones come from the prefix cache; if they were gone by admission, the payloads
    are dropped and everything is computed, with the same tokens either way."""
    shared = tokens(2 * BS, 21)
    prompt = shared + tokens(2 * BS + 5, 22)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = hf_greedy(tiny_qwen3_dir, [prompt], params.max_tokens)[0]
    a = engine(tiny_qwen3_dir)
    first, full, tail, _ = prefill(a, "x", prompt, params)
    b = engine(tiny_qwen3_dir)
    if cached_before:  # b computed the shared prefix for another request
        b.add_request("warm", shared + [1], SamplingParams(max_tokens=1, ignore_eos=True))
        drain(b)
    assert b.cached_prefix_blocks(a.block_hashes(prompt)) == (2 if cached_before else 0)
    computed_before = b.stats().num_computed_tokens
    b.add_request("x", prompt, params, output_token_ids=[first],
                  kv_blocks=[blk.payload for blk in full[2:]] + [tail.payload],
                  kv_num_tokens=len(prompt), kv_first_block=2)
    assert [first] + token_ids(drain(b)["x"]) == ref
    computed = b.stats().num_computed_tokens - computed_before
    assert computed == (params.max_tokens - 1 if cached_before
                        else len(prompt) + params.max_tokens - 1)
    with pytest.raises(ValueError, match="from block 2 need 3 payloads"):
        b.add_request("y", prompt, params, output_token_ids=[first],
                      kv_blocks=[tail.payload], kv_num_tokens=len(prompt), kv_first_block=2)


def test_agents_sharing_a_prefix_compute_it_once(tiny_llama_dir: Path) -> None:
    """Requests that arrive together with one system prompt: the first computes it,
    the others wait for its blocks instead of computing them beside it."""
    system = tokens(4 * BS, 31)
    prompts = [system + tokens(5 + i, 40 + i) for i in range(8)]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    e = engine(tiny_llama_dir, max_num_batched_tokens=1024)
    for i, p in enumerate(prompts):
        e.add_request(f"agent{i}", p, params)
    outs = drain(e)
    assert [token_ids(outs[f"agent{i}"]) for i in range(8)] == hf_greedy(
        tiny_llama_dir, prompts, params.max_tokens)
    suffixes = sum(len(p) - len(system) for p in prompts)
    decodes = 8 * (params.max_tokens - 1)
    assert e.stats().num_computed_tokens == len(system) + suffixes + decodes
    assert e.stats().num_prefix_hit_tokens == 7 * len(system)


def test_exports_skip_the_blocks_the_store_holds(tiny_llama_dir: Path) -> None:
    """A prefill exports only blocks the store lacks: not the first ``kv_held_blocks``
    (the KV connector pinned the store's copies), and not prefix-cache hits this
    engine exported before (named in ``held_blocks``, to be pinned); hits it never
    exported are exported like computed blocks, and so is every block once the store
    is known to have lost some (``forget_store``). The tokens stay the same."""
    prompt = tokens(4 * BS + 5, 51)
    e = engine(tiny_llama_dir)
    e.add_request("warm", prompt[: 3 * BS + 1], SamplingParams(max_tokens=1, ignore_eos=True))
    drain(e)
    hashes = e.block_hashes(prompt)
    want = hf_greedy(tiny_llama_dir, [prompt], 1)[0]

    def exported(rid: str, **kw) -> tuple[list[int], list[bytes]]:
        e.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True),
                      export_kv=True, **kw)
        outs = drain(e)[rid]
        assert token_ids(outs) == want and outs[-1].tail_block.num_tokens == 5
        return ([b.block_index for o in outs for b in o.exported_blocks],
                [h for o in outs for h in o.held_blocks])

    assert exported("held", kv_held_blocks=3) == ([3], [])  # 3 hits the store holds
    assert exported("partly", kv_held_blocks=1) == ([1, 2], [hashes[3]])
    assert exported("again") == ([0], hashes[1:4])
    e.forget_store()  # the store lost them (a restart): they go out again, once
    assert exported("after_loss") == ([0, 1, 2, 3], [])
    assert exported("after_that") == ([], hashes[:4])
    with pytest.raises(ValueError, match="kv_held_blocks=5"):
        e.add_request("bad", prompt, GREEDY, kv_held_blocks=5)
