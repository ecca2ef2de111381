"""One thread that calls functions at given times: every request's deadline on it.

A ``threading.Timer`` per request started a thread on each arrival (with the
interpreter shared with the engine's launches, ~0.1-0.2 ms of it per request); here a
deadline is an entry in a heap. Cancelled entries are dropped lazily, and the heap is
rebuilt when they make up most of it, so it stays as large as the live deadlines.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Timers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[list] = []  # [at, order, fn or None when cancelled]
        self._cancelled = 0
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_at(self, at: float, fn: Callable[[], None]) -> list:
        """Calls ``fn`` on the timers' thread once ``clock()`` reaches ``at``; returns the
        entry to :meth:`cancel`."""
        entry = [at, next(self._order), fn]
        with self._cv:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:
                self._cv.notify()
        return entry

    def cancel(self, entry: list) -> None:
        with self._cv:
            if entry[2] is None:
                return
            entry[2] = None
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def _run(self) -> None:
        while True:
            with self._cv:
                fn = self._next_due()
            fn()  # outside the lock: it may schedule or cancel

    def _next_due(self) -> Callable[[], None]:
        """Waits (under the lock) for the earliest live entry to fall due -> its function."""
        while True:
            while self._heap and self._heap[0][2] is None:
                heapq.heappop(self._heap)
                self._cancelled -= 1
            if not self._heap:
                self._cv.wait()
                continue
            delay = self._heap[0][0] - self._clock()
            if delay > 0:
                self._cv.wait(delay)
                continue
            return heapq.heappop(self._heap)[2]


TIMERS = Timers()  # the process's deadlines
