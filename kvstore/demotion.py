"""Background demotion by watermarks: a tier filled past ``demote_high`` of its
capacity has its least recently used unpinned blocks moved down until it is at
``demote_low``, on a thread of its own, so that a put usually finds room at once
instead of waiting for blocks to be written to the tier below.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin). Off (both 1.0) unless
configured (``kvstore.demote_high`` / ``demote_low``); the last tier is never
demoted from (it evicts on demand). Demand still wins: a put that finds no room
makes it itself, as before.
"""

from __future__ import annotations

import threading

from kvstore.moves import MAX_TRIES
from kvstore.tiers.base import Tier
from kvstore.types import Move
from services.common.logging import get_logger

log = get_logger("kvstore")


class Demotion:
    tiers: list[Tier]
    _lock: threading.Lock
    demote_high: float = 1.0
    demote_low: float = 1.0
    _demote_wake: threading.Event | None = None
    _demoting_stopped = False

    def set_watermarks(self, high: float, low: float) -> None:
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"need 0 < demote_low <= demote_high <= 1, got {low}, {high}")
        self.demote_high, self.demote_low = high, low

    def _over_watermark(self, t: Tier) -> bool:
        return t.capacity_bytes - t.free_bytes > self.demote_high * t.capacity_bytes

    def demote_soon(self) -> None:
        """After a put: wake the demoter when an upper tier is past its high mark."""
        if self.demote_high >= 1.0 or self._demoting_stopped or \
                not any(map(self._over_watermark, self.tiers[:-1])):
            return
        with self._lock:
            if self._demote_wake is None:
                self._demote_wake = threading.Event()
                threading.Thread(target=self._demote_loop, args=(self._demote_wake,),
                                 name="kv-demoter", daemon=True).start()
        self._demote_wake.set()

    def stop_demoting(self) -> None:
        """Ends the demoter's thread (the store closes: its tiers go)."""
        self._demoting_stopped = True
        if self._demote_wake is not None:
            self._demote_wake.set()

    def _demote_loop(self, wake: threading.Event) -> None:
        while True:
            wake.wait()
            wake.clear()
            if self._demoting_stopped:
                return
            try:
                self.demote_to_watermark()
            except Exception as e:  # noqa: BLE001 (a background helper must go on)
                log.error("demotion_failed", exc_info=True, error=str(e))

    def demote_to_watermark(self) -> None:
        """Every tier but the last that is past ``demote_high``: down to ``demote_low``."""
        for i, t in enumerate(self.tiers[:-1]):
            if not self._over_watermark(t):
                continue
            for _ in range(MAX_TRIES):
                with self._lock:
                    excess = t.capacity_bytes - t.free_bytes - self.demote_low * t.capacity_bytes
                    moves: list[Move] | None = None
                    if excess > 0:
                        moves = self._make_room(i, int(excess), set())
                if not moves:
                    break  # at the low mark, or all that is left is pinned
                self._carry_out(moves)
