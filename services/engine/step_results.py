"""What a processed step reports: tokens, finishes and exported KV blocks per request
(no torch here: the KV cache is passed in)."""

from __future__ import annotations

from typing import Any

from services.engine.block_manager import BlockManager
from services.engine.outputs import ExportedBlock, StepOutput
from services.engine.scheduler import ScheduledSeq
from services.engine.sequence import Sequence

Exports = dict[int, tuple[list[ExportedBlock], ExportedBlock | None]]


def export_blocks(live: list[ScheduledSeq], bm: BlockManager, kv_cache: Any,
                  after: Any = None) -> Exports:
    """Copy out the blocks of export_kv requests that became full in this step (and
    the tail of finished ones), with one device->host copy for all. On CUDA the copy
    runs on behind the step (waiting for the event ``after``, the step's end, when
    given); reading a payload waits for it."""
    bs = bm.block_size
    wanted: list[tuple[Sequence, int, bytes | None, int]] = []
    for s in live:
        seq = s.seq
        if not seq.export_kv:
            continue
        full = seq.num_computed_tokens // bs
        if full > seq.num_exported_blocks:
            hashes = bm.seq_hashes(seq, full)
            for i in range(seq.num_exported_blocks, full):
                wanted.append((seq, i, hashes[i], bs))
            seq.num_exported_blocks = full
        rest = seq.num_computed_tokens % bs
        if seq.is_finished and rest:
            wanted.append((seq, full, None, rest))
    if not wanted:
        return {}
    payloads, wait = kv_cache.export_blocks_async(
        [seq.block_table[i] for seq, i, _, _ in wanted], after)
    result: Exports = {}
    for (seq, i, h, n), payload in zip(wanted, payloads, strict=True):
        full_list, tail = result.get(seq.seq_id, ([], None))
        block = ExportedBlock(i, h, payload, n, wait)
        if h is None:
            tail = block
        else:
            full_list.append(block)
        result[seq.seq_id] = (full_list, tail)
    return result


def step_outputs(live: list[ScheduledSeq], sampled: dict[int, int], finished: list[Sequence],
                 exports: Exports) -> list[StepOutput]:
    """One output per request that got a token, blocks or its end in this step."""
    done = {id(s) for s in finished}
    results: list[StepOutput] = []
    for s in live:
        seq = s.seq
        token = sampled[seq.seq_id] if s.samples else None
        full, tail = exports.get(seq.seq_id, ([], None))
        if token is None and not full and id(seq) not in done:
            continue
        results.append(
            StepOutput(
                request_id=seq.request_id,
                new_token_ids=[] if token is None else [token],
                finished=id(seq) in done,
                finish_reason=seq.finish_reason if id(seq) in done else None,
                num_cached_tokens=seq.num_cached_tokens,
                exported_blocks=full,
                tail_block=tail,
            )
        )
    return results
