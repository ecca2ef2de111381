"""What one engine step reports (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExportedBlock:
    """KV of one block of a request, copied out of the cache after the step.

    ``payload`` is a memoryview of exactly ``LLMEngine.block_nbytes`` bytes that owns
    its memory (valid after the engine frees or reuses the block). Full blocks
    carry their chained ``block_hash`` and ``num_tokens == block_size``; the partial
    tail block has ``block_hash=None`` and ``num_tokens < block_size`` (the rest
    of its payload is garbage)."""

    block_index: int  # position in the request's block table (tokens [i*bs, (i+1)*bs))
    block_hash: bytes | None
    payload: memoryview
    num_tokens: int


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)
    exported_blocks: list[ExportedBlock] = field(default_factory=list)  # full blocks
    tail_block: ExportedBlock | None = None  # on finish, with export_kv


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
    num_finished: int
    num_aborted: int
