"""Room for new blocks: reserving slots, LRU eviction, freeing.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin): every method runs under the
core's lock and works on its index, owners and stats.
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.tiers.base import Slot, Tier
from kvstore.types import (
    Block,
    OwnerState,
    PendingPut,
    PutEntry,
    ResourceExhausted,
    StoreStats,
)


class Space:
    tiers: list[Tier]
    _blocks: dict[bytes, Block]
    _evictable: OrderedDict[bytes, Block]  # unpinned blocks, least recently used first
    _owners: dict[str, OwnerState]
    _s: StoreStats

    def _reserve(self, todo: list[PutEntry], nbytes: int, protect: set[bytes]) -> None:
        need = self.tiers[0].footprint(nbytes) * len(todo)
        free = sum(t.free_bytes for t in self.tiers)
        if need > free:  # evict LRU blocks first, all at once, or refuse changing nothing
            victims, room, sizes = [], free, {}
            for k, b in self._evictable.items():
                if k in protect:
                    continue
                victims.append(b)
                size = sizes.get((b.tier, b.slot.length))
                if size is None:
                    size = sizes[b.tier, b.slot.length] = b.tier.footprint(b.slot.length)
                room += size
                if room >= need:
                    break
            if room < need:
                self._refuse(todo, nbytes, need, room)
            self._evict(victims)
        for t in self.tiers:  # one contiguous run when a hole is big enough: one call
            run = t.allocate_run(nbytes, len(todo))
            if run is not None:
                for e, slot in zip(todo, run, strict=True):
                    e.tier, e.slot = t, slot
                return
        for i, e in enumerate(todo):  # holes: block by block, evicting more if need be
            placed = self._place(nbytes, protect)
            if placed is None:
                for done in todo[:i]:
                    done.tier.free(done.slot)
                    done.tier = done.slot = None
                self._refuse(todo, nbytes, need, sum(t.free_bytes for t in self.tiers))
            e.tier, e.slot = placed

    def _refuse(self, todo: list[PutEntry], nbytes: int, need: int, room: int) -> None:
        self._s.puts_refused += 1
        free = sum(t.free_bytes for t in self.tiers)
        room = max(room, free)
        cap = sum(t.capacity_bytes for t in self.tiers)
        raise ResourceExhausted(
            f"kvstore full: the put needs {need} bytes ({len(todo)} blocks of {nbytes}), "
            f"{free} of {cap} bytes are free and {room - free} more could be evicted "
            f"(the rest is pinned or being written); release owners or retry later")

    def _place(self, nbytes: int, protect: set[bytes]) -> tuple[Tier, Slot] | None:
        for t in self.tiers:
            slot = t.allocate(nbytes)
            if slot is not None:
                return t, slot
        for t in self.tiers:
            while True:
                victim = next((b for k, b in self._evictable.items()
                               if b.tier is t and k not in protect), None)
                if victim is None:
                    break
                self._remove(victim)
                self._s.evictions += 1
                slot = t.allocate(nbytes)
                if slot is not None:
                    return t, slot
        return None

    def _evict(self, victims: list[Block]) -> None:
        """Takes unpinned blocks out of the index and frees their slots in one go."""
        freed: dict[Tier, list[Slot]] = {}
        for b in victims:
            if self._blocks.get(b.key) is b:
                del self._blocks[b.key]
            self._evictable.pop(b.key, None)
            if b.private_owner and (o := self._owners.get(b.private_owner)) is not None:
                o.private.discard(b)
            b.dead = True
            freed.setdefault(b.tier, []).append(b.slot)
        for tier, slots in freed.items():
            tier.free_many(slots)
        self._s.evictions += len(victims)

    def _remove(self, b: Block) -> None:
        """Takes a block out of the index; frees its slot now or when unpinned."""
        if self._blocks.get(b.key) is b:
            del self._blocks[b.key]
        self._evictable.pop(b.key, None)
        if b.private_owner and (o := self._owners.get(b.private_owner)) is not None:
            o.private.discard(b)
        if b.pinners:
            b.dead = True
        elif not b.dead:
            b.dead = True
            b.tier.free(b.slot)

    def _free_pending(self, p: PendingPut) -> None:
        for e in p.entries:
            if e.slot is not None:
                e.tier.free(e.slot)
                e.slot = None
