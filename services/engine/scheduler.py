"""Continuous batching with chunked prefill and preemption (no torch here).

One step is a list of (sequence, number of new tokens). There is no separate
prefill or decode phase: a decode is a sequence with one new token, a prefill
chunk is a sequence with many, and both share a step under the token budget
``max_num_batched_tokens``:

1. running sequences first, in admission order: each gets ``min(uncomputed,
   budget)`` tokens (1 for a decode). When the blocks run out, the most
   recently admitted running sequence is preempted (its blocks are freed, it
   goes back to the front of the queue keeping its output tokens). The engine's
   ``on_preempt`` hook may first copy its KV out (swap) so that it comes back
   with it; otherwise it re-prefills prompt+outputs, hitting the prefix cache
   where it can;
2. then, unless something was preempted this step, waiting sequences are
   admitted in FCFS order while budget, ``max_num_seqs`` and blocks last; a
   prompt longer than the remaining budget is split across steps.

A sequence samples a token in a step whose chunk reaches its last token.

Async scheduling (the engine's ``async_scheduling``): the next step is scheduled
while the last one runs, before its sampled tokens reach the host. A launched
step's work shows in each sequence's ``num_inflight_tokens`` (KV being computed)
and ``num_pending_tokens`` (tokens being sampled); the next chunk starts after
them, and a decode right after a launched step feeds the token that step samples
(the runner takes it from the device). A sequence whose launched token finishes
it by length is not scheduled again; one that stops on a token is, and that
step's token for it is dropped by :meth:`Scheduler.postprocess`. Preemption
wants the last step processed first: :meth:`Scheduler.would_preempt` tells.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # num_scheduled_tokens when scheduled: new tokens are [start, start + n)
    # facts of the moment it is scheduled (the sequence moves on before the step is
    # processed): does the chunk reach the last token, so that a token is sampled;
    # the index among the outputs of that token; does its first input token come
    # from the device (sampled by the step launched before, not yet on the host)
    samples: bool = field(init=False)
    output_index: int = field(init=False)
    input_from_device: bool = field(init=False)

    def __post_init__(self) -> None:
        seq = self.seq
        self.samples = self.start + self.num_new_tokens == seq.num_planned_tokens
        self.output_index = seq.num_output_tokens + seq.num_pending_tokens
        self.input_from_device = self.start >= seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    kv_imports: list[tuple[int, Any]] = field(default_factory=list)  # (block id, payload)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # called with a sequence about to be preempted, while its blocks still hold its KV
        self.on_preempt: Callable[[Sequence], None] | None = None
        self.num_prefix_hit_tokens = 0
        self.num_imported_tokens = 0

    # ---- queue ----
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks."""
        seq = self.find(request_id)
        if seq is None:
            return None
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.kv_blocks = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return seq

    def _preempt(self, seq: Sequence) -> None:
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- one step ----
    def _ends_in_flight(self, seq: Sequence) -> bool:
        """Does a token already launched for ``seq`` finish it by length?"""
        p = seq.num_pending_tokens
        return p > 0 and (seq.num_output_tokens + p >= seq.params.max_tokens
                          or seq.num_tokens + p >= self.max_model_len)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """New tokens of running ``seq`` in the next step (0: it ends in flight)."""
        if self._ends_in_flight(seq):
            return 0
        return min(seq.num_planned_tokens - seq.num_scheduled_tokens, budget)

    def _add(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        s = ScheduledSeq(seq, n, seq.num_scheduled_tokens)
        seq.num_inflight_tokens += n
        seq.num_pending_tokens += s.samples
        out.scheduled.append(s)

    def would_preempt(self) -> bool:
        """Would :meth:`schedule` preempt now (its running pass run out of blocks)?"""
        free, budget = self.block_manager.num_free_blocks, self.max_num_batched_tokens
        if free > len(self.running) + budget // self.block_manager.block_size:
            return False  # more than the most the running pass can take
        for seq in self.running:
            if budget <= 0:
                break
            n = self._chunk(seq, budget)
            if n:
                free -= self.block_manager.blocks_to_append(seq, n)
                if free < 0:
                    return True
                budget -= n
        return False

    def waits_on_step(self, out: SchedulerOutput) -> bool:
        """Does a waiting sequence wait for a prefix block that the launched step ``out``
        computes? Then finishing that step before scheduling the next lets it in one
        step sooner (many agents sharing a system prompt join the step after the one
        that computes its last chunk, not the step after that)."""
        bm = self.block_manager
        if not bm.enable_prefix_caching or not self.waiting:
            return False
        landing: set[bytes] = set()
        for s in out.scheduled:
            seq, end = s.seq, (s.start + s.num_new_tokens) // bm.block_size
            if seq.status == SequenceStatus.RUNNING and end > seq.num_committed_blocks:
                landing.update(bm.seq_hashes(seq, end)[seq.num_committed_blocks:])
        return any(self._waits_for_prefix(seq, landing)
                   for seq in itertools.islice(self.waiting, self.max_num_seqs))

    def _seats_taken(self) -> int:
        """Running sequences, less those whose launched token finishes them."""
        return len(self.running) - sum(map(self._ends_in_flight, self.running))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if not n:
                i += 1
                continue
            while not bm.can_append(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            bm.may_append(seq, n)
            self._add(out, seq, n)
            budget -= n
            i += 1

        computing = self._blocks_being_computed()
        deferred: list[Sequence] = []
        seats = self.max_num_seqs - self._seats_taken()
        while not out.preempted and self.waiting and budget > 0 and seats > 0:
            seq = self.waiting[0]
            if self._waits_for_prefix(seq, computing):
                deferred.append(self.waiting.popleft())
                continue
            computed = bm.admission_computed_tokens(seq)
            n = min(seq.num_tokens - computed, budget)
            if not bm.can_allocate(seq, n):
                break
            self.waiting.popleft()
            out.kv_imports.extend(bm.allocate(seq, n))
            self.num_prefix_hit_tokens += seq.num_cached_tokens
            self.num_imported_tokens += seq.num_computed_tokens - seq.num_cached_tokens
            # allocate may find a longer prefix than planned (never shorter): clamp n
            n = min(n, seq.num_tokens - seq.num_computed_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add(out, seq, n)
            budget -= n
            seats -= 1
            computing.update(self._uncommitted_hashes(seq))
        self.waiting.extendleft(reversed(deferred))
        return out

    # ---- shared prefixes are computed once ----
    def _uncommitted_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full blocks ``seq`` has still to compute."""
        bm = self.block_manager
        if not bm.enable_prefix_caching or seq.num_computed_tokens >= seq.num_tokens:
            return []
        return bm.seq_hashes(seq, seq.num_tokens // bm.block_size)[seq.num_committed_blocks:]

    def _blocks_being_computed(self) -> set[bytes]:
        computing: set[bytes] = set()
        for seq in self.running:
            computing.update(self._uncommitted_hashes(seq))
        return computing

    def _waits_for_prefix(self, seq: Sequence, computing: set[bytes]) -> bool:
        """Is the first block ``seq`` would compute being computed by a running request?
        Then it waits a step or more and finds it in the prefix cache, instead of
        computing the same prefix beside it (many agents sharing a system prompt)."""
        bm = self.block_manager
        if not computing or seq.kv_blocks:
            return False
        hits = bm.prefix_hit_blocks(seq)
        if hits >= (seq.num_tokens - 1) // bm.block_size:
            return False
        return bm.seq_hashes(seq, hits + 1)[hits] in computing

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the scheduled sequences by their chunks, append the sampled tokens
        (``sampled`` maps seq_id -> token id) and mark finished ones. Finished
        sequences leave ``running`` but keep their blocks until :meth:`free`.
        Sequences that stopped running while the step ran (finished by the step
        before, aborted) are skipped: their token of this step is dropped."""
        finished: list[Sequence] = []
        for s in out.scheduled:
            seq = s.seq
            if seq.status != SequenceStatus.RUNNING:
                continue
            seq.num_inflight_tokens -= s.num_new_tokens
            seq.num_computed_tokens = s.start + s.num_new_tokens
            self.block_manager.commit(seq)
            if not s.samples:
                continue
            seq.num_pending_tokens -= 1
            token = sampled[seq.seq_id]
            seq.append_token(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                finished.append(seq)
        if finished:
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def free(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
