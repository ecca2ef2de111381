"""crc32s of the blocks a device writer spilled into a host tier, stamped after the put.

A spilled put (the gpu tier full of pinned blocks) copies device blocks into the host
arena. Its writer knows their dsum32 (summed on the device), not the crc32 that host
readers verify. Computing those on the writer's host threads as the copies landed held
the put to the crc32's rate: 13-15 ms of a 21 ms put of 512 MiB on the H200's host,
where the copies alone take 9. So the commit makes such blocks visible with their
dsum32 (a device reader verifies that on the device), and a thread of the store stamps
their crc32s soon after. A host reader, or a move that verifies on the host, meets a
block still waiting and stamps it itself first. Either way the crc32 is of the bytes
that landed, as the writer's was.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from kvstore.types import Block
from services.common.logging import get_logger
from services.transfer.bulk import crcs

log = get_logger("kvstore")


class Stamps:
    _lock: threading.Lock
    _blocks: dict[bytes, Block]
    _stamper: queue.SimpleQueue | None = None
    _stamps_queued = 0  # blocks queued for a crc32 or being stamped (Stats: moves_pending)

    def _stamp_later(self, blocks: list[Block]) -> None:
        """Queues the crc32s of ``blocks`` (committed with ``crc_pending``); the caller
        holds the lock."""
        if not blocks:
            return
        if self._stamper is None:
            self._stamper = queue.SimpleQueue()
            threading.Thread(target=self._stamp_loop, args=(self._stamper,),
                             name="kv-stamper", daemon=True).start()
        self._stamps_queued += len(blocks)
        self._stamper.put(blocks)

    def _stamp_loop(self, q: queue.SimpleQueue) -> None:
        while (blocks := q.get()) is not None:
            try:
                self.stamp(blocks)
            except Exception as e:  # noqa: BLE001 (a background helper must go on)
                log.warning("stamping_failed", error=str(e))
            finally:
                with self._lock:
                    self._stamps_queued -= len(blocks)

    def stamp(self, blocks: Sequence[Block]) -> None:
        """Stamps the crc32 of each of ``blocks`` that still waits for one. Needs no pin:
        a block whose slot was freed meanwhile left the index first, and its crc32 is
        thrown away; one still indexed where it was read had those bytes all along."""
        with self._lock:
            todo = [(b, b.tier, b.slot) for b in blocks if self._waiting(b)]
        if not todo:
            return
        sums = crcs([tier.view(slot) for _, tier, slot in todo])
        with self._lock:
            for (b, tier, slot), crc in zip(todo, sums, strict=True):
                if self._waiting(b) and b.tier is tier and b.slot == slot:
                    b.checksum, b.crc_pending = crc, False

    def _waiting(self, b: Block) -> bool:
        return b.crc_pending and not b.dead and self._blocks.get(b.key) is b
