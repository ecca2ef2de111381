"""Owners and their pins: pin, unpin, release, expiry of owners nobody releases.

An owner's pins expire ``pin_ttl_s`` after its last use, or after its own TTL when a
:meth:`Owners.pin` set one (a session keeping a paused conversation's KV).

Internals of :class:`kvstore.store.KVStoreCore` (a mixin); public methods take the
lock, the others run under it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvstore.types import Block, InvalidArgument, OwnerState, PendingPut, StoreStats, check_key


class Owners:
    pin_ttl_s: float
    _lock: threading.Lock
    _clock: Callable[[], float]
    _owners: dict[str, OwnerState]
    _pending: dict[str, PendingPut]
    _next_expiry: float
    _s: StoreStats
    _prefix: Callable[[list[bytes]], list[Block]]  # the held prefix of keys
    _queue_promotion: Callable[[Sequence[bytes], int], None]
    _free_lingering: Callable[[Block], None]
    device_tier: Any
    _rank: dict[Any, int]

    def pin(self, owner: str, keys: Sequence[bytes], ttl_s: float = 0.0) -> int:
        """Pins the longest held prefix of ``keys`` for ``owner`` (no read, no hit
        counted); ``ttl_s`` > 0 becomes the owner's own pin TTL -> blocks pinned."""
        if not owner:
            raise InvalidArgument("Pin needs an owner (who holds the pins until Release)")
        if not ttl_s >= 0:
            raise InvalidArgument(f"Pin's ttl_s must be >= 0 seconds (0: the store's "
                                  f"pin_ttl_s), got {ttl_s}")
        wanted = [check_key(k) for k in keys]
        with self._lock:
            self._expire()
            held = self._prefix(wanted)
            if not held and owner not in self._owners:
                return 0  # nothing to keep: no empty owner
            self._pin_all(self._owner(owner, ttl_s), owner, held)
            return len(held)

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
            self._drop_pins(o, owner, dropped)
            return len(dropped)

    def _drop_pins(self, o: OwnerState, owner: str, blocks: Iterable[Block]) -> None:
        """``owner`` lets go of ``blocks`` (those it pins), keeping its other pins."""
        for b in blocks:
            if b in o.pins:
                del o.pins[b]
                self._unpinned(b, owner)

    def expire(self) -> None:
        with self._lock:
            self._expire()

    def _owner(self, owner: str, ttl_s: float = 0.0) -> OwnerState:
        o = self._owners.get(owner)
        if o is None:
            o = self._owners[owner] = OwnerState(0.0)
        o.ttl_s = ttl_s or o.ttl_s
        expires = self._clock() + (o.ttl_s or self.pin_ttl_s)
        o.expires_at = expires
        self._next_expiry = min(self._next_expiry, expires)
        return o

    def _pin(self, o: OwnerState, owner: str, b: Block) -> None:
        self._pin_all(o, owner, (b,))

    def _pin_all(self, o: OwnerState, owner: str, blocks: Iterable[Block]) -> list[Block]:
        """Pins ``blocks`` for ``owner`` (out of their LRU lists) -> those it newly pinned."""
        newly = []
        for b in blocks:
            if owner not in b.pinners:
                b.pinners.add(owner)
                o.pins[b] = None
                self._lru_del(b)
                newly.append(b)
        return newly

    def _release(self, owner: str) -> int:
        o = self._owners.pop(owner, None)
        if o is None:
            return 0
        for b in o.pins:
            self._unpinned(b, owner)
        for b in list(o.private):
            self._remove(b)
        if o.promote_on_release and self.device_tier is not None:
            self._queue_promotion(list(o.promote_on_release), self._rank[self.device_tier])
        return len(o.pins)

    def _unpinned(self, b: Block, owner: str) -> None:
        """``owner`` let go of ``b``: free it when dead and unpinned, else evictable."""
        b.pinners.discard(owner)
        if b.pinners:
            return
        self._free_lingering(b)
        if b.dead:
            if not b.moving:  # else the move's finish frees what it must
                b.tier.free(b.slot)
        elif b.private_owner != owner and not b.moving:
            self._lru_add(b)

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
