"""Where a step's time goes (``splitserve bench offline --profile``).

Off by default and then free. On, each section is timed with a host clock. On
CUDA with synchronous steps the device is synchronised at section ends so that
GPU time lands in the section that queued it (this adds a sync per section:
profile runs are a little slower than plain ones). With async scheduling the
sections are host time only (``wait`` is the host blocked on the device), and
events time the device instead: ``device busy`` per step, and ``device idle``,
the gaps between steps in which the device waited for the host — the host time
that was not hidden behind the device's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StepProfiler:
    def __init__(self) -> None:
        self.enabled = False
        self.sync: Callable[[], None] | None = None
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.device_seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.counts[name] += 1

    def add_device_time(self, busy: float, idle: float) -> None:
        self.device_seconds["device busy"] += busy
        self.device_seconds["device idle"] += idle

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()
        self.device_seconds.clear()

    def table(self, steps: int) -> str:
        """One line per section: total seconds, share, milliseconds per step."""
        total = sum(self.seconds.values()) or 1.0
        lines = [f"{'section':<14}{'total s':>10}{'share':>8}{'ms/step':>10}"]
        for name, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            share, per_step = 100 * sec / total, 1000 * sec / max(1, steps)
            lines.append(f"{name:<14}{sec:>10.3f}{share:>7.1f}%{per_step:>10.3f}")
        if self.device_seconds:
            host = total - self.seconds.get("wait", 0.0)
            idle = self.device_seconds["device idle"]
            rows = [*self.device_seconds.items(), ("host hidden", max(0.0, host - idle))]
            for name, sec in rows:
                lines.append(f"{name:<14}{sec:>10.3f}{'':>8}{1000 * sec / max(1, steps):>10.3f}")
        return "\n".join(lines)
