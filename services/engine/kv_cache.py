"""The paged KV cache: one block-major tensor.

Layout ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``: one block
of one sequence (all layers, K and V) is one contiguous span of ``block_nbytes``
bytes, so exporting or importing a block is a single copy. Attention works on
the per-layer strided views returned by :meth:`KVCache.layer`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def block_nbytes_for(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
) -> int:
    """Bytes of one KV block, without allocating anything."""
    itemsize = torch.empty((), dtype=DTYPE_BY_NAME[dtype]).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


def as_uint8(payload: Any) -> torch.Tensor:
    """A flat uint8 CPU (or device) tensor over a bytes-like payload, without copying."""
    if isinstance(payload, torch.Tensor):
        return payload.reshape(-1).view(torch.uint8)
    mv = memoryview(payload)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffers (bytes): we only read from them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv.cast("B") if mv.format != "B" else mv, dtype=torch.uint8)


class KVCache:
    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.block_shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        # zeros, not empty: masked-out slots must not hold NaN (0 * NaN = NaN)
        self.tensor = torch.zeros((num_blocks, *self.block_shape), dtype=dtype, device=device)
        self.device = self.tensor.device  # with its index ("cuda:0"), for comparisons

    @property
    def block_nbytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided (K, V) views of layer ``i``, each ``[num_blocks, block_size, kv_heads, dim]``."""
        return self.tensor[:, i, 0], self.tensor[:, i, 1]

    # ---- moving whole blocks ----
    def export_blocks(self, block_ids: Sequence[int]) -> list[memoryview]:
        """Copy blocks out (one gather, one device->host copy). Each payload is a
        memoryview of exactly ``block_nbytes`` bytes that owns its memory."""
        if not block_ids:
            return []
        idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        host = self.tensor.index_select(0, idx).cpu().contiguous()
        flat = host.view(torch.uint8).reshape(len(block_ids), self.block_nbytes).numpy()
        return [memoryview(row) for row in flat]

    def export_block(self, block_id: int) -> memoryview:
        return self.export_blocks([block_id])[0]

    def check_payload(self, payload: Any) -> None:
        n = as_uint8(payload).numel()
        if n != self.block_nbytes:
            raise ValueError(f"KV block payload has {n} bytes, a block has {self.block_nbytes}")

    def import_blocks(self, items: Sequence[tuple[int, Any]]) -> None:
        """Copy payloads into blocks: [(block id, bytes-like of block_nbytes)]."""
        if not items:
            return
        on_device: list[tuple[int, torch.Tensor]] = []  # e.g. CUDA IPC views
        on_host: list[tuple[int, torch.Tensor]] = []
        for bid, payload in items:
            self.check_payload(payload)
            row = as_uint8(payload)
            (on_device if row.device == self.device else on_host).append((bid, row))
        for group in (on_host, on_device):
            if not group:
                continue
            rows = torch.stack([row for _, row in group])  # one copy; host rows: one H2D
            blocks = rows.to(self.device).view(self.dtype).view(len(group), *self.block_shape)
            idx = torch.tensor([bid for bid, _ in group], dtype=torch.long, device=self.device)
            self.tensor.index_copy_(0, idx, blocks)

    def import_block(self, block_id: int, payload: Any) -> None:
        self.import_blocks([(block_id, payload)])
