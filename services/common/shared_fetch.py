"""Blocks that several requests of one worker fetch at once come from the store once.

Agents that share a long system prompt reach a decode worker together: each asks its
engine's prefix cache first, but none finds the first one's blocks there yet (they
enter it when that request is imported), so each would fetch the same prefix from
the store. A content-named block (a full block, keyed by its chained hash) that
another request of this worker is fetching right now is taken from that fetch
instead; the taker then pins it in the store for itself (no bytes move), so that
the store keeps it for as long as the taker runs.

A fetch that has landed stays takeable for ``linger_s`` more: the fetcher's engine
names the blocks only when it admits the request (its next step), and agents arriving
in between would fetch the same prefix again (an 8K prompt's 940 MB, four times per
burst of 32 on the H200). A block the taker cannot pin (the store let it go since) is
fetched after all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from services.common.timers import TIMERS

Fetch = Callable[[Sequence[bytes]], list[Any]]  # keys -> their payloads, pinned
Pin = Callable[[Sequence[bytes]], int]  # keys -> how many got pinned


class SharedFetches:
    def __init__(self, wait_s: float = 60.0, linger_s: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future] = {}  # in flight, or landed < linger_s ago
        self.wait_s = wait_s
        self.linger_s = linger_s
        self.shared_blocks = 0  # blocks taken from another request's fetch (a counter)

    def fetch(self, keys: Sequence[bytes], shareable: int, fetch: Fetch,
              pin: Pin) -> list[Any]:
        """The payloads of ``keys``: the first ``shareable`` (content-named) that are
        being fetched by another request come from that fetch; the rest from
        ``fetch``. A shared fetch that fails is made again here."""
        mine, theirs = self._claim(keys[:shareable])
        own = mine + list(range(shareable, len(keys)))
        try:
            got = fetch([keys[i] for i in own])
        except BaseException as e:
            self._settle(keys, mine, None, e)
            raise
        self._settle(keys, mine, got, None)
        out: list[Any] = [None] * len(keys)
        for i, payload in zip(own, got, strict=True):
            out[i] = payload
        if theirs:
            self._take(keys, theirs, out, fetch, pin)
        return out

    def _claim(self, keys: Sequence[bytes]) -> tuple[list[int], dict[int, Future]]:
        mine: list[int] = []
        theirs: dict[int, Future] = {}
        with self._lock:
            for i, k in enumerate(keys):
                f = self._inflight.get(k)
                if f is None:
                    self._inflight[k] = Future()
                    mine.append(i)
                else:
                    theirs[i] = f
        return mine, theirs

    def _settle(self, keys: Sequence[bytes], mine: list[int], got: list[Any] | None,
                error: BaseException | None) -> None:
        with self._lock:
            if error is not None or self.linger_s <= 0:
                futures = [self._inflight.pop(keys[i]) for i in mine]
            else:  # landed: takeable a while longer
                futures = [self._inflight[keys[i]] for i in mine]
        for j, f in enumerate(futures):
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result(got[j])  # type: ignore[index]
        if error is None and futures and self.linger_s > 0:
            landed = {keys[i]: f for i, f in zip(mine, futures, strict=True)}
            TIMERS.call_at(time.monotonic() + self.linger_s, lambda: self._forget(landed))

    def _forget(self, landed: dict[bytes, Future]) -> None:
        """Drops landed fetches (those not replaced by a newer fetch of the key)."""
        with self._lock:
            for k, f in landed.items():
                if self._inflight.get(k) is f:
                    del self._inflight[k]

    def __len__(self) -> int:
        return len(self._inflight)

    def _take(self, keys: Sequence[bytes], theirs: dict[int, Future], out: list[Any],
              fetch: Fetch, pin: Pin) -> None:
        failed: list[int] = []
        for i, f in theirs.items():
            try:
                out[i] = f.result(timeout=self.wait_s)
            except Exception:  # noqa: BLE001 (their fetch failed: fetch it here)
                failed.append(i)
        taken = [i for i in theirs if i not in failed]
        if taken:
            pinned = pin([keys[i] for i in taken])  # the held prefix of them
            failed += taken[pinned:]  # let go by the store since they landed: fetch here
            taken = taken[:pinned]
            with self._lock:
                self.shared_blocks += len(taken)
        if failed:
            for i, payload in zip(failed, fetch([keys[i] for i in failed]), strict=True):
                out[i] = payload
