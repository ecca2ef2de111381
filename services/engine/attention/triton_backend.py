"""Paged attention on CUDA with the Triton kernels of ``triton_kernels``.

Decodes and prefill chunks of one step run in two launches (plus the KV write),
whatever the number of sequences; decode launches depend only on device memory
and on ``meta.decode_split``, so a CUDA graph can capture them.
"""

from __future__ import annotations

import os

import torch

from services.engine.attention.base import AttentionBackend
from services.engine.attention.metadata import AttentionMetadata

# Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: slow,
# but it lets the CPU-only test suite check them against the torch reference.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class TritonAttention(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(
                f"the triton attention backend needs a power-of-two head_dim >= 16, "
                f"got {head_dim}; use attention_backend: torch"
            )
        from services.engine.attention import triton_kernels

        self.kernels = triton_kernels
        self._num_sms: int | None = None

    def decode_split(self, max_seq_len: int, batch: int, device: torch.device) -> tuple[int, int]:
        if self._num_sms is None:
            self._num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else 4
            )
        return self.kernels.decode_split(max_seq_len, batch, self.num_kv_heads, self._num_sms)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] (strided view)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if not (q.is_cuda or INTERPRETED):
            raise ValueError("the triton attention backend runs on CUDA; use torch on the CPU")
        kern = self.kernels
        kern.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            split = meta.decode_split or self.decode_split(meta.decode_max_seq_len, nd, q.device)
            kern.decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                self.scale, split, out[:nd],
            )
        if meta.prefills:
            kern.prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start,
                meta.prefill_seq_lens, meta.prefill_max_query_len, self.scale, out[nd:],
            )
        return out
