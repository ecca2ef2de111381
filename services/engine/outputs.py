"""What one engine step reports (no torch here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ExportedBlock:
    """KV of one block of a request, copied out of the cache after the step.

    ``payload`` is a bytes-like (a memoryview) of exactly ``LLMEngine.block_nbytes``
    bytes that owns its memory (valid after the engine frees or reuses the block).
    Full blocks carry their chained ``block_hash`` and ``num_tokens == block_size``;
    the partial tail block has ``block_hash=None`` and ``num_tokens < block_size``
    (the rest of its payload is garbage).

    On a GPU the copy to host memory may still be running when the step returns:
    the first read of ``payload`` waits for it (from any thread), so the engine
    loop does not."""

    __slots__ = ("block_index", "block_hash", "num_tokens", "_payload", "_wait")

    def __init__(self, block_index: int, block_hash: bytes | None, payload: memoryview,
                 num_tokens: int, wait: Callable[[], object] | None = None) -> None:
        self.block_index = block_index  # position in the request's block table
        self.block_hash = block_hash
        self.num_tokens = num_tokens
        self._payload = payload
        self._wait = wait  # blocks until ``payload`` holds its bytes; None: it does

    @property
    def payload(self) -> memoryview:
        wait = self._wait
        if wait is not None:
            wait()
            self._wait = None
        return self._payload

    def __repr__(self) -> str:
        return (f"ExportedBlock(block_index={self.block_index}, block_hash={self.block_hash!r}, "
                f"num_tokens={self.num_tokens})")


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)
    exported_blocks: list[ExportedBlock] = field(default_factory=list)  # full blocks
    tail_block: ExportedBlock | None = None  # on finish, with export_kv
    # with export_kv: hashes of full blocks not exported because they were prefix-cache
    # hits whose KV this engine already exported (or imported) under that name: the
    # store holds (or is about to hold) them, so they are pinned there, not copied
    held_blocks: list[bytes] = field(default_factory=list)


def merge_outputs(outs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one: their tokens and blocks in order,
    the last one's end."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    return StepOutput(
        request_id=last.request_id,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        finished=last.finished,
        finish_reason=last.finish_reason,
        num_cached_tokens=max(o.num_cached_tokens for o in outs),
        exported_blocks=[b for o in outs for b in o.exported_blocks],
        tail_block=last.tail_block,
        held_blocks=[h for o in outs for h in o.held_blocks],
    )


@dataclass
class SwappedOut:
    """A request taken out of the engine with its KV (``LLMEngine.swap_out``).

    Resume it (here or in another engine) with ``add_request(request_id,
    prompt_token_ids, params, output_token_ids=output_token_ids,
    kv_blocks=[b.payload for b in blocks], kv_num_tokens=kv_num_tokens)``."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: Any  # SamplingParams
    kv_num_tokens: int  # tokens of prompt+outputs whose KV is in ``blocks``
    blocks: list[ExportedBlock]  # full blocks (hashed), then the partial tail if any


@dataclass
class EngineStats:
    num_kv_blocks: int
    num_free_blocks: int
    num_cached_blocks: int  # named blocks the prefix cache holds (used or free)
    num_running: int
    num_waiting: int
    num_steps: int
    num_computed_tokens: int  # tokens run through the model
    num_prefix_hit_tokens: int  # tokens taken from the prefix cache instead
    num_imported_tokens: int  # tokens whose KV came with add_request(kv_blocks=...)
    num_generated_tokens: int
    num_preemptions: int
    num_swapped_out: int  # preemptions that swapped the KV out instead of dropping it
    num_finished: int
    num_aborted: int
    num_discarded_tokens: int = 0  # computed for requests that had ended (async scheduling)
