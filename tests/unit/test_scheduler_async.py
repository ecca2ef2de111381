"""Async scheduling in the scheduler and block manager (no torch): step N+1 is
scheduled before step N is processed, against a fake device that keeps a KV cache
of token ids and samples from what it reads there. Outputs, finishes and books
equal those of one step at a time, whatever stops, preempts or hits the cache."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from services.engine.block_hash import HashContext
from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4
VOCAB = 23
EOS = 5


@dataclass
class FakeDevice:
    """Runs steps in launch order: writes each input token into its KV slot, then
    samples from the whole context read back through the block table (a wrong
    table, a reused block or a lost write changes the tokens)."""

    num_blocks: int
    kv: dict[int, int] = field(default_factory=dict)  # slot -> token id
    last: dict[int, int] = field(default_factory=dict)  # seq_id -> token of the last step
    device_inputs: int = 0

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        sampled: dict[int, int] = {}
        for s in out.scheduled:
            seq = s.seq
            for p in range(s.start, s.start + s.num_new_tokens):
                if p < seq.num_tokens:
                    token = seq.token_ids[p]
                else:  # sampled by the step launched before, not on the host yet
                    assert s.input_from_device and p == s.start and s.num_new_tokens == 1
                    token = self.last[seq.seq_id]
                    self.device_inputs += 1
                self.kv[self._slot(seq, p)] = token
            if s.samples:
                assert s.output_index < seq.params.max_tokens, "a step past max_tokens"
                end = s.start + s.num_new_tokens
                ctx = [self.kv[self._slot(seq, p)] for p in range(end)]
                sampled[seq.seq_id] = sum((i + 3) * t for i, t in enumerate(ctx)) % VOCAB
        self.last = sampled
        return sampled

    @staticmethod
    def _slot(seq: Sequence, p: int) -> int:
        return seq.block_table[p // BS] * BS + p % BS


@dataclass
class Run:
    outputs: dict[str, list[int]]
    reasons: dict[str, str | None]
    preemptions: int
    device_inputs: int
    discarded: int


def _requests(seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(3 * BS)]
    reqs = []
    for _ in range(12):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3 * BS))]
        if rng.random() < 0.5:
            prompt = shared[: rng.randint(BS, 3 * BS)] + prompt
        params = SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.3)
        reqs.append((prompt, params))
    return reqs


def _drive(seed: int, pipelined: bool, num_blocks: int, budget: int, seqs: int) -> Run:
    bm = BlockManager(num_blocks, BS, HashContext("m", BS, "float32"))
    sch = Scheduler(bm, seqs, budget, max_model_len=40, eos_token_ids=[EOS])
    device = FakeDevice(num_blocks)
    reqs = {f"r{i}": Sequence(f"r{i}", p, params)
            for i, (p, params) in enumerate(_requests(seed))}
    discarded = 0

    def complete(out: SchedulerOutput, sampled: dict[int, int]) -> None:
        nonlocal discarded
        live = [s for s in out.scheduled if s.seq.status == SequenceStatus.RUNNING]
        discarded += len(out.scheduled) - len(live)
        for seq in sch.postprocess(out, sampled):
            sch.free(seq)
        bm.check_invariants(s for s in sch.running)

    for seq in reqs.values():
        sch.add(seq)
    prev: tuple[SchedulerOutput, dict[int, int]] | None = None
    for _ in range(2000):
        if not sch.has_unfinished():
            break
        if prev is not None and (not pipelined or sch.would_preempt()):
            complete(*prev)
            prev = None
        out = sch.schedule()
        launched = (out, device.run(out)) if not out.is_empty else None
        if prev is not None:
            complete(*prev)
        prev = launched
    if prev is not None:
        complete(*prev)
    assert not sch.has_unfinished() and bm.num_free_blocks == num_blocks
    bm.check_invariants([])
    return Run({r: s.output_token_ids for r, s in reqs.items()},
               {r: s.finish_reason for r, s in reqs.items()},
               sch.num_preemptions, device.device_inputs, discarded)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_blocks, budget, seqs", [(64, 64, 8), (14, 64, 8), (40, 5, 3)],
                         ids=["roomy", "preempting", "chunked"])
def test_pipelined_steps_equal_one_at_a_time(seed: int, num_blocks: int, budget: int,
                                             seqs: int) -> None:
    one = _drive(seed, pipelined=False, num_blocks=num_blocks, budget=budget, seqs=seqs)
    pipe = _drive(seed, pipelined=True, num_blocks=num_blocks, budget=budget, seqs=seqs)
    assert pipe.outputs == one.outputs
    assert pipe.reasons == one.reasons
    assert pipe.device_inputs > 0 and one.device_inputs == 0
    assert one.discarded == 0


def test_stops_are_discarded_and_length_finishes_are_not_scheduled() -> None:
    runs = [_drive(seed, True, 64, 64, 8) for seed in range(6)]
    assert sum(r.discarded for r in runs) > 0  # an eos found after the next step launched
    assert any(r.preemptions == 0 for r in runs)
    for r in runs:  # every discarded row belongs to a request that stopped on eos
        assert r.discarded <= sum(1 for reason in r.reasons.values() if reason == "stop")


def test_preempting_schedule_waits_for_the_step_in_flight() -> None:
    bm = BlockManager(3, BS, HashContext("m", BS, "float32"))
    sch = Scheduler(bm, 4, 64, max_model_len=40)
    a = Sequence("a", list(range(2 * BS - 1)), SamplingParams(max_tokens=8, ignore_eos=True))
    b = Sequence("b", list(range(BS - 1)), SamplingParams(max_tokens=8, ignore_eos=True))
    sch.add(a)
    sch.add(b)
    first = sch.schedule()
    assert [s.num_new_tokens for s in first.scheduled] == [2 * BS - 1, BS - 1]
    assert a.num_inflight_tokens == 2 * BS - 1 and a.num_pending_tokens == 1
    assert not sch.would_preempt()  # the next tokens still fit in the blocks held
    second = sch.schedule()
    assert all(s.input_from_device and s.num_new_tokens == 1 for s in second.scheduled)
    assert [s.output_index for s in second.scheduled] == [1, 1]
    assert sch.would_preempt()  # both need a new block, one is free
    sch.postprocess(first, {a.seq_id: 1, b.seq_id: 2})
    assert a.output_token_ids == [1] and a.num_pending_tokens == 1
    assert a.num_computed_tokens == 2 * BS - 1 and a.num_inflight_tokens == 1
