"""Which worker holds which KV blocks: the gateway's index for ``kv_aware`` routing.

Workers publish the hashes their prefix cache stores and forgets (KV events, through
the Redis registry); :class:`KVIndex` keeps one set per worker and answers how long a
prefix of a request's block hashes a worker holds. :func:`prompt_hashes` names a
prompt's full blocks once, with the one block-hash function and the request's cache
salt, exactly as the workers' engines name them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from services.engine.block_hash import HashContext, block_hashes


def prompt_hashes(token_ids: Sequence[int], model: str, block_size: int, dtype: str,
                  cache_salt: str = "") -> tuple[bytes, ...]:
    """The chained hashes of the prompt's full blocks (what a worker's cache names)."""
    ctx = HashContext(model, block_size, dtype)
    return tuple(block_hashes(list(token_ids), ctx, cache_salt=cache_salt))


class KVIndex:
    """worker id -> the block hashes its prefix cache holds. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, set[bytes]] = {}

    def apply(self, worker: str, stored: Iterable[bytes], removed: Iterable[bytes]) -> None:
        with self._lock:
            held = self._held.setdefault(worker, set())
            held.difference_update(removed)
            held.update(stored)

    def reset(self, worker: str, hashes: Iterable[bytes]) -> None:
        with self._lock:
            self._held[worker] = set(hashes)

    def forget(self, worker: str) -> None:
        with self._lock:
            self._held.pop(worker, None)

    def prefix_blocks(self, worker: str, hashes: Sequence[bytes]) -> int:
        """How many leading ``hashes`` ``worker`` holds."""
        with self._lock:
            held = self._held.get(worker)
            if not held:
                return 0
            n = 0
            for h in hashes:
                if h not in held:
                    break
                n += 1
            return n

    def blocks(self) -> dict[str, int]:
        """worker id -> blocks indexed (for metrics)."""
        with self._lock:
            return {w: len(s) for w, s in self._held.items()}

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._held)
