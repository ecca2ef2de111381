"""BlockManager and Scheduler bookkeeping, without torch or a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.engine.block_hash import HashContext, block_hashes
from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4
CTX = HashContext("test-model", BS, "float32")


def seq(tokens: list[int], max_tokens: int = 4, **kw) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(f"r{tokens[:3]}-{len(tokens)}", tokens, params, **kw)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """Admit ``s`` and pretend the whole prompt was computed."""
    n = s.num_tokens - bm.admission_computed_tokens(s)
    assert bm.can_allocate(s, n)
    bm.allocate(s, n)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_allocate_and_free_balance() -> None:
    bm = BlockManager(10, BS, CTX)
    a, b = seq(list(range(10))), seq(list(range(100, 107)))
    run_prefill(bm, a)
    run_prefill(bm, b)
    assert a.block_table and b.block_table
    assert bm.num_free_blocks == 10 - 3 - 2
    bm.check_invariants([a, b])
    bm.deallocate(a)
    bm.deallocate(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 10


def test_prefix_hit_shares_blocks_and_keeps_last_token() -> None:
    bm = BlockManager(16, BS, CTX)
    prefix = list(range(8))  # two full blocks
    a = seq(prefix + [50, 51, 52])
    run_prefill(bm, a)
    b = seq(prefix + [60])
    assert bm.admission_computed_tokens(b) == 8
    bm.allocate(b, 1)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_invariants([a, b])
    # a prompt that is exactly the cached prefix still computes its last token
    c = seq(list(prefix))
    assert bm.admission_computed_tokens(c) == 4
    # the hashes are the shared module's
    assert a.block_hashes[:2] == block_hashes(prefix, CTX)


def test_a_waiting_sequences_hits_follow_the_prefix_cache() -> None:
    """Its prefix hits are looked up once per change of the cache's names: they grow
    when blocks are named, shrink when named blocks are reallocated."""
    bm = BlockManager(4, BS, CTX)
    waiting = seq(list(range(12)) + [99])
    assert bm.prefix_hit_blocks(waiting) == 0
    a = seq(list(range(8)) + [7])  # names the first two blocks of waiting's prompt
    run_prefill(bm, a)
    assert bm.prefix_hit_blocks(waiting) == 2
    assert bm.prefix_hit_blocks(waiting) == 2  # the same lookup, kept
    bm.deallocate(a)
    run_prefill(bm, seq(list(range(200, 215))))  # reallocates every block: names gone
    assert bm.prefix_hit_blocks(waiting) == 0


def test_freed_blocks_stay_cached_until_reallocated_lru() -> None:
    bm = BlockManager(4, BS, CTX)
    a = seq(list(range(9)))  # 2 full blocks + 1 partial
    run_prefill(bm, a)
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    assert bm.num_cached_blocks == 2  # full blocks remain findable
    b = seq(list(range(8)) + [99])
    assert bm.admission_computed_tokens(b) == 8
    bm.deallocate(b) if b.block_table else None
    # fill the pool with unrelated tokens: unnamed free blocks go first, then LRU eviction
    c = seq(list(range(200, 215)))  # 4 blocks
    run_prefill(bm, c)
    assert bm.num_cached_blocks == 3  # c's 3 full blocks; a's were evicted on reuse
    d = seq(list(range(8)) + [99])
    assert bm.admission_computed_tokens(d) == 0
    bm.check_invariants([c])


def test_lru_evicts_tail_blocks_first() -> None:
    bm = BlockManager(5, BS, CTX)
    a = seq(list(range(13)))  # 3 full + 1 partial -> 4 blocks
    run_prefill(bm, a)
    bm.deallocate(a)
    b = seq(list(range(300, 310)))  # needs 3 blocks: 2 unnamed free + 1 evicted
    run_prefill(bm, b)
    # the evicted one was a's last full block; its first two blocks still hit
    c = seq(list(range(13)) + [7])
    assert bm.admission_computed_tokens(c) == 8


def test_can_allocate_counts_free_hits() -> None:
    bm = BlockManager(3, BS, CTX)
    a = seq(list(range(9)))
    run_prefill(bm, a)  # 3 blocks
    assert not bm.can_allocate(seq(list(range(50, 55))), 5)
    bm.deallocate(a)
    b = seq(list(range(8)) + [1, 2, 3, 4])  # hits 2 cached-free blocks, needs 1 more
    assert bm.can_allocate(b, 4)
    bm.allocate(b, 4)
    assert bm.num_free_blocks == 0
    bm.check_invariants([b])


def test_kv_import_allocation() -> None:
    bm = BlockManager(8, BS, CTX)
    tokens = list(range(11))
    s = seq(tokens, kv_blocks=["p0", "p1", "p2"], kv_num_tokens=10)
    assert bm.admission_computed_tokens(s) == 10
    imports = bm.allocate(s, 1)
    assert [p for _, p in imports] == ["p0", "p1", "p2"]
    assert s.num_computed_tokens == 10 and s.num_cached_tokens == 0
    assert s.num_exported_blocks == 2  # the caller has those
    assert bm.num_cached_blocks == 2  # full imported blocks join the prefix cache
    # all tokens given: the last one is still computed
    t = seq(list(range(11)), kv_blocks=["x", "y", "z"], kv_num_tokens=11)
    assert bm.admission_computed_tokens(t) == 10
    bm.check_invariants([s])


def test_import_cached_block() -> None:
    bm = BlockManager(2, BS, CTX)
    hashes = block_hashes(list(range(8)), CTX)
    ids = [bm.import_cached_block(h) for h in hashes]
    assert None not in ids
    assert bm.import_cached_block(hashes[0]) is None  # already there
    assert bm.num_free_blocks == 2
    s = seq(list(range(8)) + [5])
    assert bm.admission_computed_tokens(s) == 8
    bm.check_invariants([])


def test_invariant_check_catches_leaks() -> None:
    bm = BlockManager(4, BS, CTX)
    a = seq(list(range(6)))
    run_prefill(bm, a)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # a is alive but not declared


def _drive(sch: Scheduler, steps: int = 1000) -> list[Sequence]:
    """Run the scheduler with a fake model that always samples token 7."""
    done: list[Sequence] = []
    for _ in range(steps):
        if not sch.has_unfinished():
            break
        out = sch.schedule()
        assert out.num_batched_tokens <= sch.max_num_batched_tokens
        sampled = {s.seq.seq_id: 7 for s in out.scheduled if s.samples}
        finished = sch.postprocess(out, sampled)
        for s in finished:
            sch.free(s)
        done.extend(finished)
        sch.block_manager.check_invariants(sch.running)
    return done


def test_scheduler_chunked_prefill_and_budget() -> None:
    bm = BlockManager(64, BS, CTX)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=5, max_model_len=1000)
    s = seq(list(range(23)), max_tokens=3)
    sch.add(s)
    first = sch.schedule()
    assert [x.num_new_tokens for x in first.scheduled] == [5]
    sch.postprocess(first, {})
    assert s.num_computed_tokens == 5
    done = _drive(sch)
    assert done == [s] and s.output_token_ids == [7, 7, 7] and s.finish_reason == "length"
    assert bm.num_free_blocks == 64


def test_scheduler_preempts_by_recompute() -> None:
    bm = BlockManager(6, BS, CTX)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1000)
    seqs = [seq(list(range(i * 10, i * 10 + 6)), max_tokens=10) for i in range(3)]
    for s in seqs:
        sch.add(s)
    done = _drive(sch)
    assert sch.num_preemptions > 0
    assert sorted(d.seq_id for d in done) == sorted(s.seq_id for s in seqs)
    assert all(s.output_token_ids == [7] * 10 for s in seqs)
    assert bm.num_free_blocks == 6
    bm.check_invariants([])


def test_scheduler_abort_frees_everything() -> None:
    bm = BlockManager(16, BS, CTX)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=6, max_model_len=1000)
    seqs = [seq(list(range(i * 20, i * 20 + 9)), max_tokens=5) for i in range(4)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    sch.postprocess(out, {x.seq.seq_id: 7 for x in out.scheduled if x.samples})
    assert sch.abort(seqs[0].request_id) is seqs[0]  # running, mid-prefill
    assert sch.abort(seqs[3].request_id) is seqs[3]  # waiting
    assert sch.abort("nope") is None
    assert seqs[0].finish_reason == "abort" and seqs[0].status == SequenceStatus.FINISHED
    _drive(sch)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_stop_tokens_and_eos() -> None:
    bm = BlockManager(16, BS, CTX)
    sch = Scheduler(bm, 4, 64, 1000, eos_token_ids=[7])
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5))
    b = Sequence("b", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    sch.add(a)
    sch.add(b)
    _drive(sch)
    assert a.output_token_ids == [7] and a.finish_reason == "stop"
    assert b.output_token_ids == [7] * 5 and b.finish_reason == "length"


def test_bookkeeping_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import services.engine.sequence, services.engine.block_manager\n"
        "import services.engine.scheduler, services.engine.outputs, services.engine.config\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_salt_separates_prefix_hits() -> None:
    bm = BlockManager(16, BS, CTX)
    prefix = list(range(8))
    run_prefill(bm, seq(prefix + [50], cache_salt="tenant-a"))
    assert bm.admission_computed_tokens(seq(prefix + [60], cache_salt="tenant-b")) == 0
    assert bm.admission_computed_tokens(seq(prefix + [60])) == 0
    assert bm.admission_computed_tokens(seq(prefix + [60], cache_salt="tenant-a")) == 8


def test_empty_salt_keeps_the_unsalted_chain() -> None:
    tokens = list(range(12))
    assert block_hashes(tokens, CTX, cache_salt="") == block_hashes(tokens, CTX)
    salted = block_hashes(tokens, CTX, cache_salt="t")
    assert not set(salted) & set(block_hashes(tokens, CTX))
    s = seq(tokens, cache_salt="t")
    run_prefill(BlockManager(16, BS, CTX), s)
    assert s.block_hashes == salted


def test_engine_cached_tokens_only_under_the_same_salt(tiny_llama_dir) -> None:
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    e = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64), use_tqdm=False)
    prompt = list(range(1, 50))  # three full blocks of 16 and a tail
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    def cached(rid: str, salt: str) -> int:
        e.add_request(rid, prompt, params, cache_salt=salt)
        last = None
        while e.has_unfinished():
            last = next((o for o in e.step() if o.finished), last)
        return last.num_cached_tokens

    assert cached("a1", "tenant-a") == 0
    assert cached("b1", "tenant-b") == 0  # a's prompt is invisible to b
    assert cached("b2", "tenant-b") == 48  # b reuses its own
    assert cached("a2", "tenant-a") == 48
    assert cached("n1", "") == 0
