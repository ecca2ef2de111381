"""The tokens a launched step samples: on the device at once, on the host after one
non-blocking copy into pinned memory.

The next step may be launched before they reach the host: its decodes read their
input tokens from ``device_ids`` (``StepInputs.feed_from_device``), and the host
waits for them only when it processes the step (``wait``).
"""

from __future__ import annotations

import torch


class GpuSpan:
    """Device time of one step (profiling): events at its start and end, and the
    end of the step launched before it, for the device's idle gap between them."""

    def __init__(self, prev_end: torch.cuda.Event | None) -> None:
        self.prev_end = prev_end
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.start.record()

    def seconds(self) -> tuple[float, float]:
        """(busy, idle before it); call once ``end`` has completed."""
        busy = self.start.elapsed_time(self.end) / 1e3
        idle = 0.0
        if self.prev_end is not None:
            idle = max(0.0, self.prev_end.elapsed_time(self.start) / 1e3)
        return busy, idle


class SampledIds:
    """Made right after the step is queued (on the current stream)."""

    def __init__(self, seq_ids: list[int], device_ids: torch.Tensor | None, cuda: bool,
                 span: GpuSpan | None = None) -> None:
        self.seq_ids = seq_ids
        self.rows = {sid: r for r, sid in enumerate(seq_ids)}  # seq_id -> row
        self.device_ids = device_ids  # [len(seq_ids)] int64, or None: nothing sampled
        self.span = span
        self._host = device_ids
        if device_ids is not None and cuda:
            self._host = torch.empty(device_ids.shape, dtype=device_ids.dtype, pin_memory=True)
            self._host.copy_(device_ids, non_blocking=True)
        # CUDA: passed once the step, KV writes included, and the copy are done
        self.end: torch.cuda.Event | None = None
        if cuda:
            self.end = span.end if span is not None else torch.cuda.Event()
            self.end.record()
        self._tokens: dict[int, int] | None = None

    def wait(self) -> dict[int, int]:
        """seq_id -> sampled token, once the copy has landed."""
        if self._tokens is None:
            if self.end is not None:
                self.end.synchronize()
            tokens = [] if self._host is None else self._host.tolist()
            self._tokens = dict(zip(self.seq_ids, tokens, strict=True))
        return self._tokens
