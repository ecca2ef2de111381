"""Reference paged attention in plain torch; runs on CPU and CUDA (the oracle of
the Triton kernels).

Keys and values are gathered from the block-major cache through the block
tables. Grouped-query attention is done without repeating K/V: the query heads
of one KV head are folded into the query-length dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention.base import AttentionBackend
from services.engine.attention.metadata import AttentionMetadata, PrefillChunk
from services.engine.block_manager import cdiv


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] (strided view)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for chunk in meta.prefills:
            s = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[s] = self._prefill(q[s], k_cache, v_cache, meta, chunk)
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n, bs = q.shape[0], k_cache.shape[1]
        width = cdiv(meta.decode_max_seq_len, bs)
        tables = meta.decode_block_tables[:, :width]
        length = width * bs
        # [n, blocks, bs, KVH, D] -> [n, KVH, L, D]
        flat = tables.reshape(-1)
        shape = (n, length, self.num_kv_heads, self.head_dim)
        k = k_cache.index_select(0, flat).view(shape).transpose(1, 2)
        v = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
        qg = q.view(n, self.num_kv_heads, self.group, self.head_dim)
        pos = torch.arange(length, device=q.device)
        mask = (pos[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(n, self.num_heads, self.head_dim)

    def _prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        chunk: PrefillChunk,
    ) -> torch.Tensor:
        n, ctx = chunk.num_tokens, chunk.context_len
        kvh, g, d = self.num_kv_heads, self.group, self.head_dim
        table = meta.prefill_block_tables[chunk.index, : cdiv(ctx, k_cache.shape[1])]
        k = k_cache.index_select(0, table).view(-1, kvh, d)[:ctx].transpose(0, 1)  # [KVH, L, D]
        v = v_cache.index_select(0, table).view(-1, kvh, d)[:ctx].transpose(0, 1)
        # [n, KVH, G, D] -> [KVH, G * n, D]
        qg = q.view(n, kvh, g, d).permute(1, 2, 0, 3).reshape(kvh, g * n, d)
        q_pos = torch.arange(ctx - n, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        mask = (k_pos[None, :] <= q_pos[:, None]).expand(g, n, ctx).reshape(g * n, ctx)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)
        return o.view(kvh, g, n, d).permute(2, 0, 1, 3).reshape(n, self.num_heads, d)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """New K/V of every token into its slot (slots < 0 are skipped)."""
    bs = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    blocks, offsets = slots // bs, slots % bs
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v
