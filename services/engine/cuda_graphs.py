"""CUDA graphs of the forward, captured per bucket on fixed input layouts.

* decode graphs: one per batch-size bucket up to ``max_num_seqs``, on the decode
  layout of ``StepInputs``; the context split of the decode kernel is fixed per
  bucket from max_model_len.
* chunk graphs: small steps of any kind (a short prompt, a prompt's last chunk
  beside a few decodes), one per token bucket up to ``CHUNK_GRAPH_TOKENS``, on
  the chunks layout: every sequence runs as a chunk of the prefill kernel. A
  short prefill is bound by launching its ~15 kernels a layer; replayed, it is
  bound by the GPU.

A step is padded to the smallest bucket that holds it and replayed. All graphs
share one memory pool, captured largest first. Dead Python cycles are collected before
the captures and the collector is off during them (:func:`no_collection`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.model_runner import ModelRunner
    from services.engine.step_inputs import StepBatch

log = logging.getLogger(__name__)

CHUNK_GRAPH_TOKENS = 512  # the largest step a chunk graph replays
CHUNK_GRAPH_SEQS = 16  # sequences of a chunk graph (bounds the prefill kernel's grid)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def chunk_bucket_sizes(max_tokens: int) -> list[int]:
    """Powers of two from 16 up to ``max_tokens`` (itself included when smaller)."""
    sizes = [b for b in (16, 32, 64, 128, 256, 512) if b < max_tokens]
    return sorted(set(sizes + [max_tokens]))


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Collects dead Python cycles now and keeps the collector off inside the block.
    A cycle that holds CUDA objects (an old engine's graphs, its memory, a mapped
    arena) and is freed mid-capture makes CUDA calls a capture forbids, and the
    capture fails ("operation not permitted when stream is capturing"). torch no
    longer collects before a capture (torch.compiler.config.force_cudagraph_gc)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StepGraphs:
    """Graphs of one layout; ``prepare(size)`` fills the layout with padding and
    returns its device views for ``size``."""

    def __init__(self, runner: ModelRunner, sizes: list[int],
                 prepare: Callable[[int], StepBatch], what: str, pool: object = None) -> None:
        self.sizes = sizes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        with no_collection():
            for size in reversed(self.sizes):
                pool = self._capture(runner, prepare(size), size, pool)
        self.pool = pool
        torch.cuda.synchronize(runner.device)
        log.info("captured %d %s CUDA graphs (up to %d) in %.1f s",
                 len(self.sizes), what, self.sizes[-1], time.perf_counter() - start)

    @torch.inference_mode()
    def _capture(self, runner: ModelRunner, batch: StepBatch, size: int, pool: object) -> object:
        runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)  # compile
        torch.cuda.synchronize(runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)
        self.graphs[size], self.outputs[size] = graph, out
        return graph.pool()

    def bucket(self, n: int) -> int | None:
        """The smallest captured size >= n, or None when n is larger than all."""
        return next((b for b in self.sizes if b >= n), None)

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]


def decode_graphs(runner: ModelRunner) -> StepGraphs:
    inputs, backend = runner.inputs, runner.attention_backend

    def prepare(size: int) -> StepBatch:
        batch = inputs.decode_views(size)
        batch.meta.decode_split = backend.decode_split(runner.config.max_model_len, size,
                                                       runner.device)
        inputs.fill_decode([], size)  # all padding: capture writes and reads nothing
        return batch

    return StepGraphs(runner, bucket_sizes(runner.config.max_num_seqs), prepare, "decode")


def chunk_graphs(runner: ModelRunner, pool: object) -> StepGraphs | None:
    inputs = runner.inputs
    if not inputs.chunk_tokens:
        return None

    def prepare(size: int) -> StepBatch:
        inputs.fill_chunks([], size)
        return inputs.chunk_views(size)

    return StepGraphs(runner, chunk_bucket_sizes(inputs.chunk_tokens), prepare, "chunk", pool)


def graph_memory_estimate(max_num_seqs: int, num_heads: int, head_dim: int,
                          hidden: int, intermediate: int, itemsize: int) -> int:
    """Bytes the graphs' pool may hold: split partials of the largest decode bucket
    (at most 64 splits, float32) and the activations of the largest graph, with a
    margin."""
    partials = max_num_seqs * num_heads * 64 * (head_dim + 2) * 4
    rows = max(max_num_seqs, CHUNK_GRAPH_TOKENS)
    activations = rows * (4 * hidden + 3 * intermediate) * itemsize
    return partials + activations + (256 << 20)
