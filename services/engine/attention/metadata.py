"""What attention needs to know about a flattened batch.

A batch is ``num_decodes`` one-token sequences (tokens ``0..num_decodes-1``),
then prefill chunks (several new tokens each, over a possibly cached prefix).
Every integer tensor is int32 on the engine's device and was moved there in one
copy by the runner; the host-side facts (``num_decodes``, ``prefills``, maxima)
let a backend size its launches without reading device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """Host facts of one prefill chunk: tokens [token_start, token_start + num_tokens)
    of the batch, at positions [context_len - num_tokens, context_len); its block
    table is row ``index`` of ``AttentionMetadata.prefill_block_tables``."""

    index: int
    token_start: int
    num_tokens: int
    context_len: int


@dataclass
class AttentionMetadata:
    # one per token: flat slot ``block * block_size + offset`` for its new K/V; -1: none
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, W]; entries past a length unused
    decode_seq_lens: torch.Tensor | None = None  # [D]; 0 for padding rows (graph replay)
    decode_max_seq_len: int = 0  # host: longest decode context (sizes the context split)
    # CUDA graphs fix the decode split at capture: (tokens per split, number of splits)
    decode_split: tuple[int, int] | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_query_start: torch.Tensor | None = None  # [P + 1], relative to the first chunk
    prefill_seq_lens: torch.Tensor | None = None  # [P] context length after the chunk
    prefill_block_tables: torch.Tensor | None = None  # [P, W]
    prefill_max_query_len: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)
