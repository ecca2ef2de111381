"""The KV store's index: which block lives where, who pins it, what to evict.

Pure logic over :mod:`kvstore.tiers`, no gRPC, one lock. The server maps its errors
to status codes; the bytes themselves are written and read through ``view`` by the
caller, outside the lock (a pending put or a pin keeps the slot from moving).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.checksum import crc32
from kvstore.tiers.base import Slot, Tier
from kvstore.types import (
    MAX_KEY_BYTES,
    BegunPut,
    Block,
    InvalidArgument,
    Location,
    NotFound,
    OwnerState,
    PendingPut,
    PutEntry,
    PutSlot,
    RefLike,
    ResourceExhausted,
    StoreError,
    StoreStats,
    check_key,
    hex_keys,
)

__all__ = [
    "MAX_KEY_BYTES", "BegunPut", "Block", "InvalidArgument", "KVStoreCore", "Location",
    "NotFound", "PutSlot", "ResourceExhausted", "StoreError", "StoreStats", "check_key",
]


class KVStoreCore:
    """Index, pins, two-phase puts and LRU eviction over a list of tiers (fastest first)."""

    def __init__(self, tiers: Sequence[Tier], pin_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tiers:
            raise ValueError("a KV store needs at least one tier")
        self.tiers = list(tiers)
        self.pin_ttl_s = pin_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._blocks: dict[bytes, Block] = {}
        self._evictable: OrderedDict[bytes, Block] = OrderedDict()  # LRU first
        self._owners: dict[str, OwnerState] = {}
        self._pending: dict[str, PendingPut] = {}
        self._next_expiry = float("inf")
        self._s = StoreStats()

    # -- reads ------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> tuple[int, dict[str, int]]:
        """Longest prefix of ``keys`` held in any tier, and per tier."""
        keys = [check_key(k) for k in keys]
        with self._lock:
            self._expire()
            held: list[Block] = []
            for key in keys:
                b = self._blocks.get(key)
                if b is None:
                    break
                held.append(b)
            n = len(held)
            per_tier = {}
            for t in self.tiers:
                c = 0
                while c < n and held[c].tier is t:
                    c += 1
                per_tier[t.name] = c
            self._s.lookups += 1
            self._s.lookup_keys += len(keys)
            self._s.lookup_hit_blocks += n
            return n, per_tier

    def get(self, owner: str, keys: Sequence[bytes]) -> list[Location]:
        """Pins every block for ``owner`` (none when empty) and says where they are.
        All or nothing: a missing key raises NotFound and pins nothing."""
        keys = [check_key(k) for k in keys]
        with self._lock:
            self._expire()
            found = [self._blocks.get(k) for k in keys]
            missing = [k for k, b in zip(keys, found, strict=True) if b is None]
            self._s.hits += len(keys) - len(missing)
            self._s.misses += len(missing)
            if missing:
                raise NotFound(f"{len(missing)} of {len(keys)} blocks not held: "
                               f"{hex_keys(missing)}", missing)
            if owner:
                o = self._owner(owner)
                for b in found:
                    self._pin(o, owner, b)
            else:
                for b in found:
                    if b.key in self._evictable:
                        self._evictable.move_to_end(b.key)
            return [Location(b.key, b.tier.name, b.slot.offset, b.slot.length, b.checksum)
                    for b in found]

    def view(self, loc: Location | PutSlot) -> memoryview:
        """The bytes at a location (read) or a reserved slot (write)."""
        tier = self._tier(loc.tier)
        return tier.view(Slot(loc.offset, loc.length))

    def check(self, loc: Location) -> bool:
        """Verifies a block's crc32; a block that fails is dropped and counted."""
        if crc32(self.view(loc)) == loc.checksum:
            return True
        self.drop_corrupt(loc)
        return False

    def drop_corrupt(self, loc: Location) -> None:
        with self._lock:
            self._s.checksum_failures += 1
            b = self._blocks.get(loc.key)
            if b is not None and b.slot.offset == loc.offset and b.tier.name == loc.tier:
                self._remove(b)

    # -- two-phase put ----------------------------------------------------------------
    def begin_put(self, owner: str, refs: Sequence[RefLike], block_nbytes: int) -> BegunPut:
        """Reserves a slot for every block not already held. Present blocks are pinned
        for ``owner`` at once; new ones when committed. Refuses (ResourceExhausted)
        rather than evicting pinned blocks; reserves all slots or none."""
        if block_nbytes <= 0:
            raise InvalidArgument(f"block_nbytes must be > 0, got {block_nbytes}")
        entries = [PutEntry(check_key(r.key), int(r.num_tokens), bool(r.partial)) for r in refs]
        with self._lock:
            now = self._expire()
            protect = {e.key for e in entries}
            seen: set[bytes] = set()
            todo: list[PutEntry] = []
            for e in entries:
                b = self._blocks.get(e.key)
                if e.key in seen or (b is not None and not self._replaces(b, e)):
                    if b is not None:
                        if owner:
                            self._pin(self._owner(owner), owner, b)
                        elif not b.pinners:
                            self._evictable.move_to_end(b.key)
                else:
                    todo.append(e)
                seen.add(e.key)
            if todo:
                self._reserve(todo, block_nbytes, protect)
            put_id = uuid.uuid4().hex
            self._pending[put_id] = PendingPut(owner, entries, now + self.pin_ttl_s)
            self._next_expiry = min(self._next_expiry, now + self.pin_ttl_s)
            slots = [PutSlot(e.key, False, e.slot.offset, e.slot.length, e.tier.name)
                     if e.slot is not None else PutSlot(e.key, True) for e in entries]
            return BegunPut(put_id, slots)

    def commit_put(self, put_id: str, checksums: Sequence[int]) -> tuple[int, int]:
        """Makes the written blocks visible with their crc32s -> (stored, present).
        ``checksums``: one per slot (values of present slots ignored) or one per
        written slot, in slot order."""
        with self._lock:
            p = self._pending.get(put_id)
            if p is None:
                raise NotFound(f"no pending put {put_id!r}: it was committed, aborted or "
                               f"expired after {self.pin_ttl_s:g}s; begin the put again")
            written = [e for e in p.entries if e.slot is not None]
            if len(checksums) == len(p.entries):
                sums = [c for c, e in zip(checksums, p.entries, strict=True)
                        if e.slot is not None]
            elif len(checksums) == len(written):
                sums = list(checksums)
            else:
                raise InvalidArgument(
                    f"put {put_id} has {len(p.entries)} slots ({len(written)} to write): "
                    f"send that many checksums, got {len(checksums)}")
            del self._pending[put_id]
            self._expire()
            o = self._owner(p.owner) if p.owner else None
            stored = 0
            for e, c in zip(written, sums, strict=True):
                old = self._blocks.get(e.key)
                if old is not None and not self._replaces(old, e):
                    e.tier.free(e.slot)  # a racing put stored it first
                    if o is not None:
                        self._pin(o, p.owner, old)
                    continue
                if old is not None:  # a partial block grew: the new one takes the pin
                    if o is not None and p.owner in old.pinners:
                        old.pinners.discard(p.owner)
                        o.pins.discard(old)
                    self._remove(old)
                b = Block(e.key, e.tier, e.slot, int(c) & 0xFFFFFFFF, e.num_tokens,
                          e.partial, p.owner if e.partial else "")
                self._blocks[e.key] = b
                stored += 1
                self._s.blocks_stored += 1
                self._s.bytes_stored += e.slot.length
                if o is not None:
                    self._pin(o, p.owner, b)
                    if b.private_owner:
                        o.private.add(b)
                else:
                    self._evictable[b.key] = b
            return stored, len(p.entries) - stored

    def abort_put(self, put_id: str) -> bool:
        with self._lock:
            p = self._pending.pop(put_id, None)
            if p is not None:
                self._free_pending(p)
            return p is not None

    def put(self, owner: str, refs: Sequence[RefLike], payloads: Sequence[bytes],
            block_nbytes: int) -> tuple[int, int]:
        """Begin, write and commit in one call (tests, in-process users)."""
        begun = self.begin_put(owner, refs, block_nbytes)
        sums = []
        try:
            for s, data in zip(begun.slots, payloads, strict=True):
                if len(data) != block_nbytes:
                    raise InvalidArgument(f"payload of {len(data)} bytes, expected "
                                          f"{block_nbytes}")
                if not s.present:
                    self.view(s)[:] = data
                sums.append(0 if s.present else crc32(data))
        except BaseException:
            self.abort_put(begun.put_id)
            raise
        return self.commit_put(begun.put_id, sums)

    # -- owners -----------------------------------------------------------------------
    def release(self, owner: str) -> int:
        """Drops every pin of ``owner`` and deletes its private blocks -> pins dropped."""
        with self._lock:
            self._expire()
            return self._release(owner)

    def expire(self) -> None:
        with self._lock:
            self._expire()

    # -- stats ------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        with self._lock:
            self._expire()
            s = StoreStats(**{k: v for k, v in vars(self._s).items() if k != "tiers"})
            s.blocks = len(self._blocks)
            s.pinned_blocks = sum(1 for b in self._blocks.values() if b.pinners)
            s.pins = sum(len(o.pins) for o in self._owners.values())
            s.owners = len(self._owners)
            s.pending_puts = len(self._pending)
            counts = {t.name: 0 for t in self.tiers}
            for b in self._blocks.values():
                counts[b.tier.name] += 1
            s.tiers = [(t.name, t.capacity_bytes, t.used_bytes, counts[t.name])
                       for t in self.tiers]
            return s

    def close(self) -> None:
        for t in self.tiers:
            t.close()

    # -- internals (lock held) --------------------------------------------------------
    def _tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise InvalidArgument(f"no tier {name!r}; tiers: {[t.name for t in self.tiers]}")

    @staticmethod
    def _replaces(old: Block, e: PutEntry) -> bool:
        """A partial block grows: a re-put with another token count replaces it."""
        return old.partial and e.partial and old.num_tokens != e.num_tokens

    def _owner(self, owner: str) -> OwnerState:
        expires = self._clock() + self.pin_ttl_s
        o = self._owners.get(owner)
        if o is None:
            o = self._owners[owner] = OwnerState(expires)
        o.expires_at = expires
        self._next_expiry = min(self._next_expiry, expires)
        return o

    def _pin(self, o: OwnerState, owner: str, b: Block) -> None:
        if owner not in b.pinners:
            b.pinners.add(owner)
            o.pins.add(b)
            self._evictable.pop(b.key, None)

    def _reserve(self, todo: list[PutEntry], nbytes: int, protect: set[bytes]) -> None:
        need = self.tiers[0].footprint(nbytes) * len(todo)
        free = sum(t.free_bytes for t in self.tiers)
        room = free
        if need > free:  # eviction needed: refuse up front what eviction cannot fix
            room += sum(b.tier.footprint(b.slot.length)
                        for k, b in self._evictable.items() if k not in protect)
        if need <= free:  # one contiguous run when a hole is big enough: one call
            for t in self.tiers:
                run = t.allocate_run(nbytes, len(todo))
                if run is not None:
                    for e, slot in zip(todo, run, strict=True):
                        e.tier, e.slot = t, slot
                    return
        if need <= room:
            for i, e in enumerate(todo):
                placed = self._place(nbytes, protect)
                if placed is None:
                    for done in todo[:i]:
                        done.tier.free(done.slot)
                        done.tier = done.slot = None
                    break
                e.tier, e.slot = placed
            else:
                return
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

    def _release(self, owner: str) -> int:
        o = self._owners.pop(owner, None)
        if o is None:
            return 0
        for b in o.pins:
            b.pinners.discard(owner)
            if b.pinners:
                continue
            if b.dead:
                b.tier.free(b.slot)
            elif b.private_owner != owner:
                self._evictable[b.key] = b
        for b in list(o.private):
            self._remove(b)
        return len(o.pins)

    def _free_pending(self, p: PendingPut) -> None:
        for e in p.entries:
            if e.slot is not None:
                e.tier.free(e.slot)
                e.slot = None

    def _expire(self) -> float:
        now = self._clock()
        if now < self._next_expiry:
            return now
        for owner in [k for k, o in self._owners.items() if o.expires_at <= now]:
            self._release(owner)
            self._s.expired_owners += 1
        for put_id in [k for k, p in self._pending.items() if p.expires_at <= now]:
            self._free_pending(self._pending.pop(put_id))
        self._next_expiry = min([o.expires_at for o in self._owners.values()]
                                + [p.expires_at for p in self._pending.values()],
                                default=float("inf"))
        return now
