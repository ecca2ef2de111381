"""Room for new blocks: reserving slots, LRU victims, demotion plans, eviction, freeing.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin): every method runs under the
core's lock and works on its index, owners and stats. Making room in a tier that has
a tier below it plans :class:`Move`s (victims copied down, then freed above), which the
caller carries out outside the lock (:mod:`kvstore.moves`) and then tries again; only
the last tier deletes its victims.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvstore.landing import LandingPads
from kvstore.tiers.base import Slot, Tier
from kvstore.types import (
    Block,
    Move,
    OwnerState,
    PendingPut,
    PutEntry,
    ResourceExhausted,
    StoreStats,
    TierCounters,
)


class Space:
    tiers: list[Tier]
    _blocks: dict[bytes, Block]
    _lru: dict[Tier, OrderedDict[bytes, Block]]  # unpinned, settled blocks, LRU first
    _owners: dict[str, OwnerState]
    _s: StoreStats
    _ts: dict[Tier, TierCounters]
    _seen: OrderedDict[bytes, None]
    _leaving: dict[Tier, int]  # bytes of the tier's blocks being moved out of it
    # slots pinned blocks moved out of, which their readers may still read in place
    _lingering: dict[Block, list[tuple[Tier, Slot]]]
    _pads: LandingPads | None  # the shared arena's landing pads (kvstore.landing)
    _abandon: Callable[[list[Move]], None]  # kvstore.moves: ends moves as failed copies

    # -- the LRU lists ----------------------------------------------------------------
    def _lru_add(self, b: Block) -> None:
        lru = self._lru[b.tier]
        lru[b.key] = b
        lru.move_to_end(b.key)

    def _lru_del(self, b: Block) -> None:
        self._lru[b.tier].pop(b.key, None)

    # -- reserving --------------------------------------------------------------------
    def _reserve(self, todo: list[PutEntry], nbytes: int, protect: set[bytes],
                 i: int = 0, patient: bool = True) -> list[Move] | None:
        """Slots for ``todo`` in tier ``i`` -> None when reserved; else the moves
        to carry out before trying again, or none: wait for the moves under way out of
        the tier (the room they free is the put's: a device put that spilled while the
        demoter was freeing the gpu tier would land in the slower tier for nothing).
        Refuses (ResourceExhausted), changing nothing, when even every unpinned block
        of the tier and the moves under way (unless it is not ``patient``: it waited
        long enough) would not make room."""
        t = self.tiers[i]
        need = t.footprint(nbytes) * len(todo)
        free = t.free_bytes
        leaving = self._leaving[t] if patient else 0
        if need > free:  # make room all at once, or refuse changing nothing
            victims, room = self._victims(t, need - free, protect)
            if free + room + leaving < need:
                self._refuse(todo, nbytes, need, free + room, i)
            moves = self._dispose(i, victims, protect)
            if moves or free + room < need:
                return moves
        run = t.allocate_run(nbytes, len(todo))  # one call when a hole is big enough
        if run is not None:
            for e, slot in zip(todo, run, strict=True):
                e.tier, e.slot = t, slot
            return None
        for j, e in enumerate(todo):  # holes: block by block
            slot = t.allocate(nbytes)
            if slot is None:
                for done in todo[:j]:
                    t.free(done.slot)
                    done.tier = done.slot = None
                victims, _ = self._victims(t, t.footprint(nbytes), protect)
                if not victims and leaving < t.footprint(nbytes):
                    self._refuse(todo, nbytes, need, t.free_bytes, i)
                return self._dispose(i, victims, protect)
            e.tier, e.slot = t, slot
        return None

    def _refuse(self, todo: list[PutEntry], nbytes: int, need: int, room: int,
                i: int) -> None:
        t = self.tiers[i]
        free = t.free_bytes
        room = max(room, free)
        raise ResourceExhausted(
            f"kvstore full: the put needs {need} bytes ({len(todo)} blocks of {nbytes}) in "
            f"the {t.name} tier, {free} of {t.capacity_bytes} bytes are free and "
            f"{room - free} more could be made free (the rest is pinned or being written "
            f"or moved); release owners, retry later or configure a larger "
            f"kvstore.tiers[{i}].bytes")

    def _victims(self, t: Tier, need: int, protect: set[bytes]) -> tuple[list[Block], int]:
        """Least recently used unpinned blocks of ``t`` worth ``need`` bytes (or all)."""
        victims, room, sizes = [], 0, {}
        for k, b in self._lru[t].items():
            if room >= need:
                break
            if k in protect:
                continue
            victims.append(b)
            size = sizes.get(b.slot.length)
            if size is None:
                size = sizes[b.slot.length] = t.footprint(b.slot.length)
            room += size
        return victims, room

    def _dispose(self, i: int, victims: list[Block], protect: set[bytes]) -> list[Move]:
        """Victims of tier ``i`` leave it: deleted from the last tier, else planned as
        moves to tier i+1 (those the tier below will not admit, or cannot take even by
        making room, are deleted). May plan moves deeper down first: then the victims
        stay where they are until a later try."""
        if i == len(self.tiers) - 1:
            self._evict(victims)
            return []
        below = self.tiers[i + 1]
        moves: list[Move] = []
        dropped: list[Block] = []
        try:
            for b in victims:
                if not self._admits(below, b):
                    dropped.append(b)
                    continue
                slot = below.allocate(b.slot.length)
                if slot is None:
                    deeper = self._make_room(i + 1, below.footprint(b.slot.length),
                                             protect)
                    if deeper is None:  # the tier below is full of pinned blocks
                        dropped.append(b)
                        continue
                    moves.extend(deeper)
                    slot = below.allocate(b.slot.length)
                    if slot is None:  # room comes when the deeper moves are done
                        break
                moves.append(self._start_move(b, below, slot))
            self._evict(dropped)
        except BaseException:  # none of the moves planned so far is left under way
            self._abandon(moves)
            raise
        return moves

    def _start_move(self, b: Block, dst: Tier, slot: Slot, fetch: bool = False) -> Move:
        """Plans ``b``'s move into ``slot`` of ``dst``: no victim, no other move of it,
        until ``Moves._finish``; its bytes count as leaving its tier meanwhile."""
        b.moving = True
        self._lru_del(b)
        self._leaving[b.tier] += b.tier.footprint(b.slot.length)
        return Move(b, b.tier, b.slot, dst, slot, fetch)

    def _make_room(self, i: int, need: int, protect: set[bytes]) -> list[Move] | None:
        """Frees ``need`` bytes of tier ``i`` (evicting, or planning moves down) -> the
        moves, or None when there is nothing to free."""
        victims, _ = self._victims(self.tiers[i], need, protect)
        if not victims:
            return None
        return self._dispose(i, victims, protect)

    def _admits(self, t: Tier, b: Block) -> bool:
        """The admission rule of a slower tier (``admit: seen``: keys asked before)."""
        return getattr(t, "admit", "all") != "seen" or b.key in self._seen

    # -- freeing ----------------------------------------------------------------------
    def _evict(self, victims: list[Block]) -> None:
        """Takes unpinned blocks out of the index and frees their slots in one go."""
        freed: dict[Tier, list[Slot]] = {}
        for b in victims:
            if self._blocks.get(b.key) is b:
                del self._blocks[b.key]
            self._lru_del(b)
            if b.private_owner and (o := self._owners.get(b.private_owner)) is not None:
                o.private.discard(b)
            b.dead = True
            freed.setdefault(b.tier, []).append(b.slot)
        for tier, slots in freed.items():
            tier.free_many(slots)
            self._ts[tier].evictions += len(slots)
        self._s.evictions += len(victims)

    def _remove(self, b: Block) -> None:
        """Takes a block out of the index; frees its slot now or when unpinned."""
        if self._blocks.get(b.key) is b:
            del self._blocks[b.key]
        self._lru_del(b)
        if b.private_owner and (o := self._owners.get(b.private_owner)) is not None:
            o.private.discard(b)
        if b.pinners:
            b.dead = True
        elif not b.dead:
            b.dead = True
            b.tier.free(b.slot)
            self._free_lingering(b)

    def _give_pad_back(self, p: PendingPut) -> None:
        """A put ended (committed, aborted, expired): its landing pad is free again."""
        if p.pad is not None and self._pads is not None:
            self._pads.give_back(p.pad)

    def _free_lingering(self, b: Block) -> None:
        """The slots ``b`` was moved out of under pins, once no reader holds it."""
        for tier, slot in self._lingering.pop(b, ()):
            tier.free(slot)

    def _free_pending(self, p: PendingPut) -> None:
        self._give_pad_back(p)
        for e in p.entries:
            if e.slot is not None:
                e.tier.free(e.slot)
                e.slot = None
