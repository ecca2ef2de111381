"""Runs one scheduled step: KV imports, input preparation, forward, sampling.

The batch is flattened: decodes (one new token each) first, then prefill
chunks, all in one forward. ``launch`` queues a step and returns at once with
its ``SampledIds``; a decode of the next step whose input token that step samples
reads it on the device. Inputs are built with numpy and moved in one copy
(``StepInputs``); on CUDA, unless ``enforce_eager``, pure-decode steps replay a
decode graph and other small steps a chunk graph (``cuda_graphs``). On CUDA the
KV cache takes what a profiling forward at the largest step leaves under
``gpu_memory_utilization``.
"""

from __future__ import annotations

import logging

import torch

from services.engine.block_manager import cdiv
from services.engine.config import EngineConfig
from services.engine.cuda_graphs import (
    CHUNK_GRAPH_SEQS,
    CHUNK_GRAPH_TOKENS,
    StepGraphs,
    chunk_graphs,
    decode_graphs,
    graph_memory_estimate,
)
from services.engine.kv_cache import DTYPE_BY_NAME, KVCache, block_nbytes_for
from services.engine.loader import load_model
from services.engine.profiler import StepProfiler
from services.engine.sampled import GpuSpan, SampledIds
from services.engine.sampler import Sampler
from services.engine.scheduler import ScheduledSeq, SchedulerOutput
from services.engine.sequence import SamplingParams, Sequence
from services.engine.step_inputs import StepBatch, StepInputs

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0  # upper bound of the default KV cache on the CPU


def num_kv_blocks(config: EngineConfig, block_nbytes: int, reserved_bytes: int = 0) -> int:
    """Blocks of the KV cache: given, from a memory size, or from free GPU memory
    less ``reserved_bytes`` (activations and graphs, measured by profiling)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb is not None:
        n = int(config.kv_cache_memory_gb * (1 << 30)) // block_nbytes
    elif config.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(config.device))
        budget = config.gpu_memory_utilization * total - (total - free) - reserved_bytes
        n = int(budget) // block_nbytes
    else:
        useful = config.max_num_seqs * cdiv(config.max_model_len, config.block_size) + 1
        n = min(int(CPU_KV_CACHE_GB * (1 << 30)) // block_nbytes, useful)
    if n < 1:
        raise ValueError(
            f"no memory left for the KV cache (block of {block_nbytes} bytes); lower "
            f"max_num_batched_tokens or max_num_seqs, or raise gpu_memory_utilization"
        )
    return n


class ModelRunner:
    def __init__(self, config: EngineConfig, use_tqdm: bool = True) -> None:
        config.finalize()
        self.config = config
        mc = config.model_config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.block_size = config.block_size
        self.model = load_model(config, use_tqdm=use_tqdm)
        self.attention_backend = self.model.attention_backend
        self.profiler = StepProfiler()
        if self.device.type == "cuda" and not config.async_scheduling:
            self.profiler.sync = lambda: torch.cuda.synchronize(self.device)
        self._last: SampledIds | None = None  # of the step launched last
        graphs = self._use_graphs()
        self.inputs = StepInputs(
            max_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            max_seqs=config.max_num_seqs,
            max_blocks=cdiv(config.max_model_len, config.block_size),
            block_size=config.block_size,
            device=self.device,
            chunk_tokens=min(CHUNK_GRAPH_TOKENS, config.max_num_batched_tokens) if graphs else 0,
            chunk_seqs=min(CHUNK_GRAPH_SEQS, config.max_num_seqs) if graphs else 0,
        )
        self.sampler = Sampler(config.seed, self.device)
        self.graphs: StepGraphs | None = None
        self.chunk_graphs: StepGraphs | None = None
        nbytes = block_nbytes_for(
            mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, config.dtype
        )
        self.kv_cache = self._new_cache(num_kv_blocks(config, nbytes, self._reserved_bytes()))
        log.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            self.kv_cache.num_blocks,
            config.block_size,
            self.kv_cache.num_blocks * nbytes / (1 << 20),
        )
        if self.device.type == "cuda":
            self._warm_up()
        if graphs:
            self.graphs = decode_graphs(self)
            self.chunk_graphs = chunk_graphs(self, self.graphs.pool)

    def _new_cache(self, blocks: int) -> KVCache:
        mc = self.config.model_config
        return KVCache(blocks, mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim,
                       DTYPE_BY_NAME[self.config.dtype], self.device)

    def _use_graphs(self) -> bool:
        return (
            self.device.type == "cuda"
            and not self.config.enforce_eager
            and getattr(self.model.attention_backend, "supports_cuda_graphs", False)
        )

    # ---- memory ----
    def _reserved_bytes(self) -> int:
        """On CUDA with the KV cache sized from free memory: the peak activation memory
        of the largest step (measured) plus the decode graphs' pool (estimated)."""
        cfg = self.config
        sized = cfg.num_kv_blocks is None and cfg.kv_cache_memory_gb is None
        if self.device.type != "cuda" or not sized:
            return 0
        peak = self._profile_peak_bytes()
        graphs = 0
        if self._use_graphs():
            mc = cfg.model_config
            graphs = graph_memory_estimate(
                cfg.max_num_seqs, mc.num_heads, mc.head_dim, mc.hidden_size,
                mc.intermediate_size, DTYPE_BY_NAME[cfg.dtype].itemsize,
            )
        log.info("profiled step: %.0f MiB of activations, %.0f MiB kept for CUDA graphs",
                 peak / (1 << 20), graphs / (1 << 20))
        return peak + graphs

    @torch.inference_mode()
    def _profile_peak_bytes(self) -> int:
        """Run the largest step the scheduler can make (max_num_batched_tokens over
        max_num_seqs sequences, every one sampling with top-p) on a scratch cache."""
        cfg = self.config
        seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        tokens = min(cfg.max_num_batched_tokens, seqs * cfg.max_model_len)
        lengths = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
        saved = getattr(self, "kv_cache", None)
        self.kv_cache = self._new_cache(sum(cdiv(n, self.block_size) for n in lengths))
        scheduled = self._synthetic_step(lengths, decodes=0)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._run(scheduled)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.kv_cache = saved
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One eager step of decodes beside a prompt chunk filling the token budget, so
        that first-use costs (kernel compiles, library heuristics, allocator growth)
        are paid here and not by the first requests. It writes K/V into blocks no
        request holds yet."""
        cfg = self.config
        decodes = min(cfg.max_num_seqs - 1, cfg.max_num_batched_tokens - 1, 8)
        chunk = min(cfg.max_num_batched_tokens - decodes, cfg.max_model_len)
        lengths = [min(cfg.max_model_len, 2 * self.block_size + 1)] * decodes + [chunk]
        if sum(cdiv(n, self.block_size) for n in lengths) > self.kv_cache.num_blocks:
            return
        self._run(self._synthetic_step(lengths, decodes))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _synthetic_step(self, lengths: list[int], decodes: int) -> list[ScheduledSeq]:
        """Sequences of the given lengths on consecutive blocks; the first ``decodes``
        feed their last token, the others their whole prompt. All sample with top-p."""
        params = SamplingParams(temperature=1.0, top_p=0.9)
        scheduled, next_block = [], 0
        for i, n in enumerate(lengths):
            seq = Sequence(f"synthetic-{i}", [1] * n, params)
            seq.block_table = list(range(next_block, next_block + cdiv(n, self.block_size)))
            next_block += len(seq.block_table)
            start = n - 1 if i < decodes else 0
            scheduled.append(ScheduledSeq(seq, n - start, start))
        return scheduled

    # ---- steps ----
    def _forward(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of the step, rows that sample or None for all rows)."""
        n = len(scheduled)
        size = self.graphs.bucket(n) if self.graphs is not None else None
        if size is not None and all(s.num_new_tokens == 1 for s in scheduled):
            with self.profiler.section("prepare"):
                self.inputs.fill_decode(scheduled, size)
            with self.profiler.section("forward"):
                hidden = self.graphs.replay(size)[:n]
            rows = [i for i, s in enumerate(scheduled) if s.samples]
            if len(rows) == n:
                return hidden, None
            return hidden, torch.tensor(rows, device=self.device)
        size = self._chunk_bucket(scheduled)
        if size is not None:
            with self.profiler.section("prepare"):
                rows = self.inputs.fill_chunks(scheduled, size)
            with self.profiler.section("forward"):
                return self.chunk_graphs.replay(size), rows
        with self.profiler.section("prepare"):
            batch: StepBatch = self.inputs.fill_general(scheduled)
        with self.profiler.section("forward"):
            hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        return hidden, batch.sample_rows

    def _chunk_bucket(self, scheduled: list[ScheduledSeq]) -> int | None:
        if self.chunk_graphs is None or len(scheduled) > self.inputs.chunk_seqs:
            return None
        return self.chunk_graphs.bucket(sum(s.num_new_tokens for s in scheduled))

    def _run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor | None:
        """Queue the step; the sampled tokens of its sampling rows, on the device."""
        hidden, rows = self._forward(scheduled)
        samplers = [s for s in scheduled if s.samples]
        if not samplers:
            return None
        with self.profiler.section("sample"):
            logits = self.model.compute_logits(hidden if rows is None else hidden[rows])
            return self.sampler.sample(
                logits, [s.seq.params for s in samplers], [s.output_index for s in samplers]
            )

    def _feed_from_device(self, scheduled: list[ScheduledSeq]) -> None:
        """Decodes whose input token the last launched step samples read it there."""
        rows = [i for i, s in enumerate(scheduled) if s.input_from_device]
        if not rows:
            return
        last = self._last
        if last is None or last.device_ids is None:
            raise AssertionError("a decode waits for a token no launched step samples")
        src = [last.rows[scheduled[i].seq.seq_id] for i in rows]
        self.inputs.feed_from_device(rows, src, last.device_ids)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> SampledIds:
        """Queue one step (KV imports, inputs, forward, sampling) without waiting
        for it; its tokens come with ``SampledIds.wait``."""
        span = None
        if self.profiler.enabled and self.device.type == "cuda":
            span = GpuSpan(self._last.span.end if self._last and self._last.span else None)
        if out.kv_imports:
            with self.profiler.section("kv_import"):
                self.kv_cache.import_blocks(out.kv_imports)
        scheduled = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)  # stable
        ids = None
        if scheduled:
            self._feed_from_device(scheduled)
            ids = self._run(scheduled)
        seq_ids = [s.seq.seq_id for s in scheduled if s.samples]
        self._last = SampledIds(seq_ids, ids, self.device.type == "cuda", span)
        return self._last

    def collect(self, sampled: SampledIds) -> dict[int, int]:
        """Wait for a launched step's tokens: seq_id -> token of each sampling row."""
        tokens = sampled.wait()
        if sampled.span is not None:
            self.profiler.add_device_time(*sampled.span.seconds())
        return tokens

    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        """Run one step and wait for it (``launch`` + ``collect``)."""
        return self.collect(self.launch(out))
