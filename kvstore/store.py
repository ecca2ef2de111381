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
from kvstore.space import Space
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


class KVStoreCore(Space):
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

    def get(self, owner: str, keys: Sequence[bytes], *,
            prefix: bool = False) -> list[Location]:
        """Pins every block for ``owner`` (none when empty) and says where they are.
        All or nothing: a missing key raises NotFound and pins nothing. With ``prefix``:
        the longest held prefix of ``keys`` instead (possibly none), pinned; nothing
        past it is pinned and a missing key raises nothing."""
        keys = [check_key(k) for k in keys]
        blocks = self._blocks
        with self._lock:
            self._expire()
            if prefix:
                found = []
                for k in keys:
                    b = blocks.get(k)
                    if b is None:
                        break
                    found.append(b)
                self._s.hits += len(found)
                self._s.misses += len(keys) - len(found)
            else:
                found = [blocks.get(k) for k in keys]
                if None in found:
                    missing = [k for k, b in zip(keys, found, strict=True) if b is None]
                    self._s.hits += len(keys) - len(missing)
                    self._s.misses += len(missing)
                    raise NotFound(f"{len(missing)} of {len(keys)} blocks not held: "
                                   f"{hex_keys(missing)}", missing)
                self._s.hits += len(keys)
            if owner and found:
                o = self._owner(owner)
                pin = self._pin
                for b in found:
                    pin(o, owner, b)
            elif not owner:
                evictable = self._evictable
                for b in found:
                    if b.key in evictable:
                        evictable.move_to_end(b.key)
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
        entries = []
        for r in refs:
            k = r.key
            if type(k) is not bytes or not 0 < len(k) <= MAX_KEY_BYTES:
                k = check_key(k)
            entries.append(PutEntry(k, int(r.num_tokens), bool(r.partial)))
        with self._lock:
            now = self._expire()
            blocks = self._blocks
            protect = {e.key for e in entries}
            seen: set[bytes] = set()
            todo: list[PutEntry] = []
            for e in entries:
                b = blocks.get(e.key)
                if e.key not in seen and (b is None or self._replaces(b, e)):
                    todo.append(e)
                elif b is not None:
                    if owner:
                        self._pin(self._owner(owner), owner, b)
                    elif not b.pinners:
                        self._evictable.move_to_end(b.key)
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
            owner = p.owner
            o = self._owner(owner) if owner else None
            blocks, evictable = self._blocks, self._evictable
            stored = nbytes = 0
            for e, c in zip(written, sums, strict=True):
                old = blocks.get(e.key)
                if old is not None:
                    if not self._replaces(old, e):
                        e.tier.free(e.slot)  # a racing put stored it first
                        if o is not None:
                            self._pin(o, owner, old)
                        continue
                    # a partial block grew: the new one takes the pin
                    if o is not None and owner in old.pinners:
                        old.pinners.discard(owner)
                        o.pins.discard(old)
                    self._remove(old)
                b = Block(e.key, e.tier, e.slot, int(c) & 0xFFFFFFFF, e.num_tokens,
                          e.partial, owner if e.partial else "")
                blocks[e.key] = b
                stored += 1
                nbytes += e.slot.length
                if o is not None:  # a new block: pinned by its owner only
                    b.pinners.add(owner)
                    o.pins.add(b)
                    if b.private_owner:
                        o.private.add(b)
                else:
                    evictable[b.key] = b
            self._s.blocks_stored += stored
            self._s.bytes_stored += nbytes
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

    def unpin(self, owner: str, keys: Sequence[bytes]) -> int:
        """Drops the pins ``owner`` holds on ``keys`` (its private blocks stay until
        ``release``) -> pins dropped."""
        wanted = {check_key(k) for k in keys}
        with self._lock:
            self._expire()
            o = self._owners.get(owner)
            if o is None or not wanted:
                return 0
            dropped = [b for b in o.pins if b.key in wanted]
            for b in dropped:
                o.pins.discard(b)
                self._unpinned(b, owner)
            return len(dropped)

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

    def _release(self, owner: str) -> int:
        o = self._owners.pop(owner, None)
        if o is None:
            return 0
        for b in o.pins:
            self._unpinned(b, owner)
        for b in list(o.private):
            self._remove(b)
        return len(o.pins)

    def _unpinned(self, b: Block, owner: str) -> None:
        """``owner`` let go of ``b``: free it when dead and unpinned, else evictable."""
        b.pinners.discard(owner)
        if b.pinners:
            return
        if b.dead:
            b.tier.free(b.slot)
        elif b.private_owner != owner:
            self._evictable[b.key] = b

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
