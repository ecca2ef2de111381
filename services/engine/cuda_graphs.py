"""CUDA graphs of the decode forward, one per batch-size bucket.

Each graph is captured on the fixed decode layout of ``StepInputs`` (views of
one device buffer), largest bucket first, all in one memory pool; a step of
``n`` decodes fills that layout padded to the smallest bucket >= n and replays.
The context split of the decode kernel is fixed per bucket from max_model_len.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        self.sizes = bucket_sizes(runner.config.max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            pool = self._capture(runner, size, pool)
        torch.cuda.synchronize(runner.device)
        log.info("captured %d decode CUDA graphs (batch sizes up to %d) in %.1f s",
                 len(self.sizes), self.sizes[-1], time.perf_counter() - start)

    @torch.inference_mode()
    def _capture(self, runner: ModelRunner, size: int, pool: object) -> object:
        inputs = runner.inputs
        batch = inputs.decode_views(size)
        backend = runner.attention_backend
        batch.meta.decode_split = backend.decode_split(runner.config.max_model_len, size,
                                                       runner.device)
        inputs.fill_decode([], size)  # all padding: capture writes and reads nothing
        runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)  # compile
        torch.cuda.synchronize(runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)
        self.graphs[size], self.outputs[size] = graph, out
        return graph.pool()

    def bucket(self, n: int) -> int | None:
        """The smallest captured batch size >= n, or None when n is larger than all."""
        return next((b for b in self.sizes if b >= n), None)

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]


def graph_memory_estimate(max_num_seqs: int, num_heads: int, head_dim: int,
                          hidden: int, intermediate: int, itemsize: int) -> int:
    """Bytes the decode graphs' pool may hold: split partials of the largest bucket
    (at most 64 splits, float32) and its activations, with a margin."""
    partials = max_num_seqs * num_heads * 64 * (head_dim + 2) * 4
    activations = max_num_seqs * (4 * hidden + 3 * intermediate) * itemsize
    return partials + activations + (256 << 20)
