"""Runs one scheduled step: KV imports, input preparation, forward, sampling.

The batch is flattened: decodes (one new token each) first, then prefill
chunks. CUDA graphs are not implemented yet (``enforce_eager``).
"""

from __future__ import annotations

import logging

import torch

from services.engine.attention import AttentionMetadata, PrefillChunk
from services.engine.block_manager import cdiv
from services.engine.config import EngineConfig
from services.engine.kv_cache import DTYPE_BY_NAME, KVCache, block_nbytes_for
from services.engine.loader import load_model
from services.engine.sampler import Sampler
from services.engine.scheduler import ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0  # upper bound of the default KV cache on the CPU


def num_kv_blocks(config: EngineConfig, block_nbytes: int) -> int:
    """Blocks of the KV cache: given, from a memory size, or from free GPU memory."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb is not None:
        n = int(config.kv_cache_memory_gb * (1 << 30)) // block_nbytes
    elif config.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(config.device))
        budget = free - (1.0 - config.gpu_memory_utilization) * total
        n = int(budget) // block_nbytes
    else:
        useful = config.max_num_seqs * cdiv(config.max_model_len, config.block_size) + 1
        n = min(int(CPU_KV_CACHE_GB * (1 << 30)) // block_nbytes, useful)
    if n < 1:
        raise ValueError(f"no memory left for the KV cache (block of {block_nbytes} bytes)")
    return n


class ModelRunner:
    def __init__(self, config: EngineConfig, use_tqdm: bool = True) -> None:
        config.finalize()
        self.config = config
        mc = config.model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(config, use_tqdm=use_tqdm)
        nbytes = block_nbytes_for(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, config.dtype
        )
        self.kv_cache = KVCache(
            num_kv_blocks(config, nbytes),
            mc.num_layers,
            config.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            DTYPE_BY_NAME[config.dtype],
            self.device,
        )
        log.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            self.kv_cache.num_blocks,
            config.block_size,
            self.kv_cache.num_blocks * nbytes / (1 << 20),
        )
        self.sampler = Sampler(config.seed, self.device)

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def prepare(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, index of each sampling row's
        last token). ``scheduled`` must be ordered decodes first."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        sample_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for s in scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            token_start = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            for p in range(start, start + n):
                slot_blocks.append(table[p // bs])
                slot_offsets.append(p % bs)
            ctx = start + n
            if n == 1:
                assert not prefills, "decodes must come before prefill chunks"
                decode_tables.append(table[: cdiv(ctx, bs)])
                decode_lens.append(ctx)
            else:
                prefills.append(
                    PrefillChunk(token_start, n, ctx, self._tensor(table[: cdiv(ctx, bs)]))
                )
            if s.samples:
                sample_idx.append(len(ids) - 1)
        meta = AttentionMetadata(
            slot_block_ids=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            num_decodes=len(decode_lens),
            prefills=prefills,
        )
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = self._tensor(
                [t + [0] * (width - len(t)) for t in decode_tables]
            )
            meta.decode_context_lens = self._tensor(decode_lens)
        return self._tensor(ids), self._tensor(positions), meta, sample_idx

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        """Run one step; returns seq_id -> sampled token for the sequences that sample."""
        if out.kv_imports:
            self.kv_cache.import_blocks(out.kv_imports)
        if not out.scheduled:
            return {}
        scheduled = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)  # stable
        input_ids, positions, meta, sample_idx = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        samplers = [s for s in scheduled if s.samples]
        if not samplers:
            return {}
        logits = self.model.compute_logits(hidden[self._tensor(sample_idx)])
        tokens = self.sampler(
            logits,
            [s.seq.params for s in samplers],
            [s.seq.num_output_tokens for s in samplers],
        )
        return {s.seq.seq_id: t for s, t in zip(samplers, tokens, strict=True)}
