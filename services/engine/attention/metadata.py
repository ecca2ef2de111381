"""What attention needs to know about a flattened batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """One sequence with several new tokens: tokens [token_start, token_start + num_tokens)
    of the batch, at positions [context_len - num_tokens, context_len)."""

    token_start: int
    num_tokens: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class AttentionMetadata:
    """A batch is ``num_decodes`` one-token sequences (tokens 0..num_decodes-1), then
    prefill chunks. New K/V go to ``slot_block_ids``/``slot_offsets`` (one per token)."""

    slot_block_ids: torch.Tensor  # [T] long
    slot_offsets: torch.Tensor  # [T] long
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks] long, 0-padded
    decode_context_lens: torch.Tensor | None = None  # [D] long
    prefills: list[PrefillChunk] = field(default_factory=list)
