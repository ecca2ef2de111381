"""Prefix blocks this worker's engine is computing now, so that a request arriving
meanwhile does not ask the store for them.

Agents that share a long system prompt reach a prefill worker together. The first
misses the store and computes the prefix; each later one, finding nothing in its
engine's prefix cache yet, would ask the store too, and miss too: the blocks reach
the store only after the engine computed them. Those Get calls cost each arrival a
round trip, on the threads that share the engine's interpreter while it computes the
very prefix they wait for. A block named here is being computed by another request of
this worker: the engine will have it sooner than the store, and its scheduler holds
the later request until it does.

Entries expire after ``ttl_s`` (a request that died before computing them, or a step
that waits long in the engine's queue): then the store is asked again. No torch here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

COMPUTING_TTL_S = 10.0


class ComputingPrefixes:
    def __init__(self, ttl_s: float = COMPUTING_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._until: OrderedDict[bytes, float] = OrderedDict()  # hash -> expiry, oldest first

    def add(self, hashes: Sequence[bytes]) -> None:
        """A request will compute the blocks named ``hashes``."""
        if not hashes:
            return
        with self._lock:
            now = self._clock()
            self._expire(now)
            until = now + self.ttl_s
            for h in hashes:
                self._until[h] = until
                self._until.move_to_end(h)

    def computing(self, block_hash: bytes) -> bool:
        """Is a request of this worker computing the block ``block_hash``?"""
        with self._lock:
            until = self._until.get(block_hash)
            return until is not None and until > self._clock()

    def __len__(self) -> int:
        return len(self._until)

    def _expire(self, now: float) -> None:
        while self._until:
            h, until = next(iter(self._until.items()))
            if until > now:
                return
            del self._until[h]
