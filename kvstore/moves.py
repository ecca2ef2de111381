"""Blocks moving between tiers: demotion (copied down, then freed above) and promotion.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin). A move is planned under the
lock (the block is marked ``moving``: no other move, no eviction; its target slot is
reserved), its bytes are copied and verified *outside* the lock, and it is finished
under the lock: the index points at the new slot and the old one is freed. Readers
keep reading the old slot meanwhile. A demotion whose block was pinned meanwhile is
dropped (a reader of the CPU arena holds its offset); a promotion goes on under pins:
a memory tier's old slot, which a pinned reader may be reading in place, is freed when
the block's last pin goes (disk readers re-resolve a block whose file went, see
``KVStoreCore.read``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.tiers.base import BlockMeta, Slot, Tier
from kvstore.types import Block, Move, StoreStats, TierCounters
from services.common.logging import get_logger
from services.transfer.bulk import crcs
from services.transfer.contract.checksum import crc32
from services.transfer.contract.device_checksum import KIND_CRC32

log = get_logger("kvstore")
MAX_TRIES = 16  # rounds of plan / copy / finish before a put or a promotion gives up
MOVES_WAIT_S = 5.0  # how long a put waits for the moves under way to free its room


# a copy's outcome: (verified?, the block's checksum in its new tier, its dsum32 if known)
Copied = tuple[bool | None, int, int | None]


class Moves:
    tiers: list[Tier]
    _lock: threading.Lock
    _moved: threading.Condition  # on the lock: notified when moves finish
    _blocks: dict[bytes, Block]
    _s: StoreStats
    _ts: dict[Tier, TierCounters]
    _lru: dict[Tier, OrderedDict[bytes, Block]]
    _rank: dict[Tier, int]
    _leaving: dict[Tier, int]
    _lingering: dict[Block, list[tuple[Tier, Slot]]]
    _start_move: Callable[..., Move]

    # -- carrying out -----------------------------------------------------------------
    def _carry_out(self, moves: list[Move]) -> None:
        """Copies (lock not held), then finishes every move under the lock."""
        if not moves:
            return
        try:
            copied = self._copy_all(moves)
        except BaseException:
            with self._lock:
                self._abandon(moves)
            raise
        for t in {m.dst for m, (good, *_) in zip(moves, copied, strict=True) if good}:
            try:
                t.sync()
            except OSError as e:
                log.warning("tier_sync_failed", tier=t.name, error=str(e))
        with self._lock:
            for m, (good, checksum, dsum) in zip(moves, copied, strict=True):
                self._finish(m, good, checksum, dsum)
            self._moved.notify_all()

    def _abandon(self, moves: list[Move]) -> None:
        """Ends ``moves`` as failed copies (the lock held): no block stays moving or
        counted as leaving, and their target slots are free again."""
        for m in moves:
            self._finish(m, None, 0, None)
        self._moved.notify_all()

    def _copy_all(self, moves: list[Move]) -> list[Copied]:
        """``_copy`` of every move. Moves between a device tier and a memory tier go in
        batches of one (source, target, size): one checksum launch and one wait for many
        blocks. The store shares its GPU with the workers' processes, and each wait of
        its own has to take its turn on the GPU."""
        results: dict[int, Copied] = {}
        batches: dict[tuple[Tier, Tier, int], list[int]] = {}
        for i, m in enumerate(moves):
            if (m.src.on_device and m.dst.has_view) or (m.dst.on_device and m.src.has_view):
                batches.setdefault((m.src, m.dst, m.src_slot.length), []).append(i)
            else:
                results[i] = self._copy(m)
        for index in batches.values():
            batch = [moves[i] for i in index]
            try:
                got = self._copy_batch(batch)
            except OSError as e:
                log.warning("tier_copy_failed", src=batch[0].src.name, dst=batch[0].dst.name,
                            blocks=len(batch), error=str(e))
                got = [(None, 0, None)] * len(batch)
            results.update(zip(index, got, strict=True))
        return [results[i] for i in range(len(moves))]

    @staticmethod
    def _copy_batch(batch: list[Move]) -> list[Copied]:
        """Blocks of one size between a device tier and a memory tier, verified with the
        source's checksum kind and stamped with the target's (as ``_copy``). Blocks
        raised from host memory whose dsum32 the store knows are verified on the device
        after the copy: the host threads do not read their bytes."""
        src, dst = batch[0].src, batch[0].dst
        if src.on_device:
            sums = src.checksums([m.src_slot for m in batch])
            good = [m for m, c in zip(batch, sums, strict=True) if c == m.block.checksum]
            outs = [dst.view(m.dst_slot) for m in good]
            src.read_many_into([m.src_slot for m in good], outs)
            stamps = dict(zip(map(id, good), crcs(outs), strict=True))
            return [(True, stamps[id(m)], m.block.checksum) if id(m) in stamps
                    else (False, 0, None) for m in batch]
        datas = [src.view(m.src_slot) for m in batch]
        on_host = [(m, d) for m, d in zip(batch, datas, strict=True)
                   if m.block.device_checksum is None]
        bad = {id(m) for (m, _), c in zip(on_host, crcs([d for _, d in on_host]),
                                          strict=True) if c != m.block.checksum}
        sound = [(m, d) for m, d in zip(batch, datas, strict=True) if id(m) not in bad]
        good = [m for m, _ in sound]
        dst.write_many([m.dst_slot for m in good], [d for _, d in sound],
                       [BlockMeta(m.block.key, m.block.checksum, m.block.num_tokens,
                                  m.block.partial) for m in good])
        sums = dst.checksums([m.dst_slot for m in good])
        # blocks with a known dsum32 were not read on the host: a copy that differs from
        # it was corrupt there
        stamps = {id(m): c for m, c in zip(good, sums, strict=True)
                  if m.block.device_checksum in (None, c)}
        return [(True, stamps[id(m)], None) if id(m) in stamps else (False, 0, None)
                for m in batch]

    def _copy(self, m: Move) -> Copied:
        """(True, the block's checksum in its new tier, its dsum32 where known): copied
        and verified; False: the source failed its checksum (a corrupt block); None: the
        copy failed for another reason (the move is dropped). A device tier's blocks are
        verified there and stamped there (dsum32); host tiers' carry crc32, and the
        dsum32 they came with (the same bytes)."""
        b = m.block
        on_host = m.src.checksum_kind == KIND_CRC32
        dsum = b.device_checksum if on_host else b.checksum
        # a spilled block not stamped yet: its crc32 is of the bytes as they lie, as a
        # stamp's would be
        trusted = on_host and b.crc_pending
        try:
            if not on_host and m.src.checksum(m.src_slot) != b.checksum:
                return False, 0, None
            if m.dst.has_view:
                out = m.dst.view(m.dst_slot)
                m.src.read_into(m.src_slot, out)
                crc = crc32(out)
                return (not on_host or trusted or crc == b.checksum), crc, dsum
            data = m.src.view(m.src_slot) if m.src.has_view else self._read_copy(m)
            crc = crc32(data)
            if on_host and not trusted and crc != b.checksum:
                return False, 0, None
            m.dst.write(m.dst_slot, data, BlockMeta(b.key, crc, b.num_tokens, b.partial))
            if m.dst.checksum_kind == KIND_CRC32:
                return True, crc, dsum
            return True, m.dst.checksum(m.dst_slot), None
        except ValueError:  # a block file with a bad header: corrupt
            return False, 0, None
        except OSError as e:
            log.warning("tier_copy_failed", src=m.src.name, dst=m.dst.name,
                        key=b.key.hex(), error=str(e))
            return None, 0, None

    @staticmethod
    def _read_copy(m: Move) -> memoryview:
        out = memoryview(bytearray(m.src_slot.length))
        m.src.read_into(m.src_slot, out)
        return out

    def _finish(self, m: Move, ok: bool | None, checksum: int, dsum: int | None) -> None:
        b = m.block
        b.moving = False
        self._leaving[m.src] -= m.src.footprint(m.src_slot.length)
        up = self.tiers.index(m.dst) < self.tiers.index(m.src)
        stale = b.dead or b.tier is not m.src or b.slot != m.src_slot
        if ok is False and not stale:
            self._s.checksum_failures += 1
            self._ts[m.src].checksum_failures += 1
            log.warning("checksum_failure", key=b.key.hex(), tier=m.src.name)
            self._remove(b)
        if not ok or stale or (b.pinners and not up and not m.fetch):
            m.dst.free(m.dst_slot)  # the block went, or a reader holds it where it is
            if not b.dead and not b.pinners and not b.private_owner:
                self._lru_add(b)
            return
        self._lru_del(b)
        if b.pinners and (m.src.has_view or m.src.on_device):
            # a reader may still read the old slot in place: it goes with the last pin
            self._lingering.setdefault(b, []).append((m.src, m.src_slot))
        else:
            m.src.free(m.src_slot)
        b.tier, b.slot, b.checksum, b.crc_pending = m.dst, m.dst_slot, checksum, False
        b.device_checksum = None if m.dst.on_device else dsum
        if up:
            self._s.promotions += 1
            self._ts[m.dst].promotions += 1
        else:
            self._s.demotions += 1
            self._ts[m.src].demotions += 1
        if not b.pinners and not b.private_owner:
            self._lru_add(b)

    # -- promotion --------------------------------------------------------------------
    def _raise(self, blocks: Sequence[Block], target: int = 0, *,
               fetch: bool = False) -> set[Block]:
        """Moves ``blocks`` into tier ``target`` (making room there by demotion) -> the
        blocks that could not be moved (gone, corrupt, or no room: all pinned).
        ``fetch``: for a reader that pinned them (they move under its pins)."""
        top = self.tiers[target]
        protect = {b.key for b in blocks}
        waiting = list(blocks)
        for _ in range(MAX_TRIES):
            moves: list[Move] = []
            with self._lock:
                waiting = [b for b in waiting if not b.dead and b.tier is not top]
                if not waiting:
                    break
                short, room = 0, None
                for b in waiting:
                    if b.moving:
                        continue  # another move of it is under way: look again later
                    slot = top.allocate(b.slot.length)
                    if slot is None:
                        short += top.footprint(b.slot.length)
                        continue
                    moves.append(self._start_move(b, top, slot, fetch))
                if short:
                    try:
                        room = self._make_room(target, short, protect)
                    except BaseException:
                        self._abandon(moves)
                        raise
                    moves.extend(room or ())
                    if room is None and not moves and not self._leaving[top] and \
                            not any(b.moving for b in waiting):
                        break  # nothing to demote, nothing leaving: all pinned
                if not moves and room is None:  # another thread moves them: wait for it
                    self._moved.wait(timeout=1.0)
            self._carry_out(moves)
        with self._lock:
            return {b for b in blocks if b.dead or b.tier is not top}

    def promote(self, keys: Sequence[bytes], target: int = 0) -> tuple[int, int, int, int]:
        """Raises the held ``keys`` into tier ``target`` (the first: the fastest) ->
        (raised, already there or above, not held, not raised: no room or corrupt). A
        corrupt block is dropped on the way."""
        with self._lock:
            held = [b for k in keys if (b := self._blocks.get(k)) is not None]
            slow = [b for b in held if self._rank[b.tier] > target]
        failed = self._raise(slow, target) if slow else set()
        return (len(slow) - len(failed), len(held) - len(slow), len(keys) - len(held),
                len(failed))

    def promote_later(self, keys: Sequence[bytes], target: int = 0) -> None:
        """``promote`` on a background thread; dropped when it is behind."""
        if keys:
            with self._lock:
                self._queue_promotion(keys, target)

    def _queue_promotion(self, keys: Sequence[bytes], target: int) -> None:
        """``promote_later`` for a caller that holds the lock."""
        if self._promoter is None:
            self._promoter = queue.Queue(maxsize=256)
            threading.Thread(target=self._promote_loop, args=(self._promoter,),
                             name="kv-promoter", daemon=True).start()
        with contextlib.suppress(queue.Full):  # behind: this promotion is skipped
            self._promoter.put_nowait((list(keys), target))
            self._promotions_queued += len(keys)

    _promoter: queue.Queue | None = None
    _promotions_queued = 0  # keys of promotions queued or running (Stats: moves_pending)

    def _promote_loop(self, q: queue.Queue) -> None:
        while (job := q.get()) is not None:
            try:
                self.promote(*job)
            except Exception as e:  # noqa: BLE001 (a background helper must go on)
                log.error("promotion_failed", exc_info=True, error=str(e))
            finally:
                with self._lock:
                    self._promotions_queued -= len(job[0])
