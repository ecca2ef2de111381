"""What a processed step reports: tokens, finishes and exported KV blocks per request
(no torch here: the KV cache is passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.engine.block_manager import BlockManager
from services.engine.outputs import ExportedBlock, StepOutput
from services.engine.scheduler import ScheduledSeq
from services.engine.sequence import Sequence


@dataclass
class SeqExports:
    """One request's blocks out of one step."""

    full: list[ExportedBlock] = field(default_factory=list)
    tail: ExportedBlock | None = None
    held: list[bytes] = field(default_factory=list)  # hashes the store holds already


Exports = dict[int, SeqExports]


def export_blocks(live: list[ScheduledSeq], bm: BlockManager, kv_cache: Any,
                  after: Any = None) -> Exports:
    """Copy out the blocks of export_kv requests that became full in this step (and
    the tail of finished ones), with one device->host copy for all; prefix-cache hits
    whose KV the store holds already are named (``held``), not copied. On CUDA the copy
    runs on behind the step (waiting for the event ``after``, the step's end, when
    given); reading a payload waits for it."""
    bs = bm.block_size
    result: Exports = {}
    wanted: list[tuple[Sequence, int, bytes | None, int]] = []
    for s in live:
        seq = s.seq
        if not seq.export_kv:
            continue
        full = seq.num_computed_tokens // bs
        if full > seq.num_exported_blocks:
            hashes = bm.seq_hashes(seq, full)
            for i in range(seq.num_exported_blocks, full):
                if bm.held_by_store(seq, i):
                    result.setdefault(seq.seq_id, SeqExports()).held.append(hashes[i])
                else:
                    wanted.append((seq, i, hashes[i], bs))
                    bm.mark_in_store(seq.block_table[i], hashes[i])
            seq.num_exported_blocks = full
        rest = seq.num_computed_tokens % bs
        if seq.is_finished and rest:
            wanted.append((seq, full, None, rest))
    if not wanted:
        return result
    payloads, wait = kv_cache.export_blocks_async(
        [seq.block_table[i] for seq, i, _, _ in wanted], after)
    for (seq, i, h, n), payload in zip(wanted, payloads, strict=True):
        mine = result.setdefault(seq.seq_id, SeqExports())
        block = ExportedBlock(i, h, payload, n, wait)
        if h is None:
            mine.tail = block
        else:
            mine.full.append(block)
    return result


def step_outputs(live: list[ScheduledSeq], sampled: dict[int, int], finished: list[Sequence],
                 exports: Exports) -> list[StepOutput]:
    """One output per request that got a token, blocks or its end in this step."""
    done = {id(s) for s in finished}
    results: list[StepOutput] = []
    for s in live:
        seq = s.seq
        token = sampled[seq.seq_id] if s.samples else None
        ex = exports.get(seq.seq_id, SeqExports())
        if token is None and not ex.full and not ex.held and id(seq) not in done:
            continue
        results.append(
            StepOutput(
                request_id=seq.request_id,
                new_token_ids=[] if token is None else [token],
                finished=id(seq) in done,
                finish_reason=seq.finish_reason if id(seq) in done else None,
                num_cached_tokens=seq.num_cached_tokens,
                exported_blocks=ex.full,
                tail_block=ex.tail,
                held_blocks=ex.held,
            )
        )
    return results
