"""Two-phase puts: reserve slots, write them outside the lock, commit with checksums.

Internals of :class:`kvstore.store.KVStoreCore` (a mixin). A put that finds the first
tier full makes room by demoting its least recently used unpinned blocks (copied
outside the lock, :mod:`kvstore.moves`) and tries again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from kvstore.landing import LANDING_WAIT_S, LandingPads, wait_landed
from kvstore.moves import MAX_TRIES, MOVES_WAIT_S
from kvstore.types import (
    MAX_KEY_BYTES,
    BegunPut,
    Block,
    DeadlineExceeded,
    InvalidArgument,
    Move,
    NotFound,
    OwnerState,
    PendingPut,
    PutEntry,
    PutSlot,
    RefLike,
    ResourceExhausted,
    StoreStats,
    check_key,
)
from services.common.logging import get_logger
from services.transfer.contract.checksum import crc32

log = get_logger("kvstore")


class Puts:
    pin_ttl_s: float
    _lock: threading.Lock
    _moved: threading.Condition
    _blocks: dict[bytes, Block]
    _pending: dict[str, PendingPut]
    _next_expiry: float
    _s: StoreStats
    demote_soon: Callable[[], None]
    home: Callable[[bool], int]
    _stamp_later: Callable[[list[Block]], None]
    _owners: dict[str, OwnerState]
    _drop_pins: Callable[[OwnerState, str, Iterable[Block]], None]
    _pads: LandingPads | None
    _give_pad_back: Callable[[PendingPut], None]
    _pin_all: Callable[[OwnerState, str, Iterable[Block]], list[Block]]

    def begin_put(self, owner: str, refs: Sequence[RefLike], block_nbytes: int, *,
                  device: bool = False, wait_s: float | None = None,
                  landing: bool = False) -> BegunPut:
        """Reserves a slot for every block not already held, in the writer's home tier
        (``device``: the gpu tier; when its blocks are all pinned, the host memory tier:
        the put is *spilled*). Present blocks are pinned for ``owner`` at once; new ones
        when committed. Refuses (ResourceExhausted) rather than evicting pinned blocks;
        reserves all slots or none, and a refused put lets go of the pins it took.
        Waits up to ``wait_s`` (MOVES_WAIT_S) for moves under way that make its room.
        ``landing``: the writer writes a landing token after its copies; a spilled put
        gets a pad for it, while one is free (kvstore.landing)."""
        home = self.home(device)
        if block_nbytes <= 0:
            raise InvalidArgument(f"block_nbytes must be > 0, got {block_nbytes}")
        entries = []
        for r in refs:
            k = r.key
            if type(k) is not bytes or not 0 < len(k) <= MAX_KEY_BYTES:
                k = check_key(k)
            entries.append(PutEntry(k, int(r.num_tokens), bool(r.partial)))
        protect = {e.key for e in entries}
        pinned: list[Block] = []  # held blocks this put pinned: let go if it is refused
        tries = 0
        wait_until = time.monotonic() + (MOVES_WAIT_S if wait_s is None else wait_s)
        try:
            while tries < MAX_TRIES:
                with self._lock:
                    now = self._expire()
                    todo = self._todo(owner, entries, pinned)
                    patient = time.monotonic() < wait_until
                    moves, home = self._reserve_or_spill(
                        todo, block_nbytes, protect, home, patient) if todo else (None, home)
                    if moves is None:
                        return self._pend(owner, entries, now, device,
                                          spilled=device and home != self.home(True),
                                          landing=landing)
                    if not moves:  # the room comes as moves under way land
                        self._moved.wait(timeout=max(0.0, wait_until - time.monotonic()))
                        continue
                tries += 1
                self._carry_out(moves)
            raise ResourceExhausted(f"kvstore busy: no room for the put after {tries} "
                                    "rounds of demotion (other puts took the room); retry")
        except ResourceExhausted:
            if pinned:
                with self._lock:
                    if (o := self._owners.get(owner)) is not None:
                        self._drop_pins(o, owner, pinned)
            raise

    def _todo(self, owner: str, entries: list[PutEntry],
              pinned: list[Block]) -> list[PutEntry]:
        """The entries to write (not held, or a partial block that grew); the held
        ones are pinned for ``owner`` (those it did not pin yet added to ``pinned``),
        or touched."""
        blocks = self._blocks
        seen: set[bytes] = set()
        todo: list[PutEntry] = []
        for e in entries:
            b = blocks.get(e.key)
            if e.key not in seen and (b is None or self._replaces(b, e)):
                todo.append(e)
            elif b is not None:
                if owner:
                    pinned += self._pin_all(self._owner(owner), owner, (b,))
                elif not b.pinners and b.key in self._lru[b.tier]:
                    self._lru[b.tier].move_to_end(b.key)
            seen.add(e.key)
        return todo

    def _reserve_or_spill(self, todo: list[PutEntry], nbytes: int, protect: set[bytes],
                          home: int, patient: bool) -> tuple[list[Move] | None, int]:
        """``_reserve`` in tier ``home``; a device put that the gpu tier refuses goes to
        the host memory tier (device writers copy into its shared arena) -> (its moves,
        the tier). A put refused everywhere is counted once."""
        try:
            try:
                return self._reserve(todo, nbytes, protect, home, patient), home
            except ResourceExhausted:
                if not self.tiers[home].on_device:
                    raise
            spill = self.home(False)
            return self._reserve(todo, nbytes, protect, spill, patient), spill
        except ResourceExhausted:
            self._s.puts_refused += 1
            raise

    def _pend(self, owner: str, entries: list[PutEntry], now: float, device: bool = False,
              spilled: bool = False, landing: bool = False) -> BegunPut:
        put_id = uuid.uuid4().hex
        pad = (self._pads.take() if landing and spilled and self._pads is not None
               and any(e.slot is not None for e in entries) else None)
        self._pending[put_id] = PendingPut(owner, entries, now + self.pin_ttl_s, device,
                                           pad)
        self._next_expiry = min(self._next_expiry, now + self.pin_ttl_s)
        slots = [PutSlot(e.key, False, e.slot.offset, e.slot.length, e.tier.name)
                 if e.slot is not None else PutSlot(e.key, True) for e in entries]
        if spilled:
            log.info("put_spilled", owner=owner, blocks=len(slots),
                     tier=self.tiers[self.home(False)].name)
        return BegunPut(put_id, slots, spilled, pad)

    def commit_put(self, put_id: str, checksums: Sequence[int],
                   host_checksums: Sequence[int] = (), *, landing: bool = False,
                   wait_s: float | None = None,
                   wanted: Callable[[], bool] | None = None) -> tuple[int, int]:
        """Makes the written blocks visible with their checksums -> (stored, present).
        ``checksums``: one per slot (values of present slots ignored) or one per
        written slot, in slot order: crc32s, or a device writer's dsum32s (a spilled
        put's blocks keep theirs beside a crc32: ``host_checksums``, the writer's, one
        per written slot, else the store stamps them soon after: kvstore.stamps).
        ``landing``: the copies may still be on their way; the commit waits for the
        put's landing token first (:meth:`_await_landing`)."""
        if landing:
            self._await_landing(put_id, wait_s, wanted)
        stamps = self._host_stamps(put_id, host_checksums)
        spilled: list[Block] = []
        with self._lock:
            p = self._pending_put(put_id)
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
            self._give_pad_back(p)
            self._expire()
            owner = p.owner
            o = self._owner(owner) if owner else None
            blocks = self._blocks
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
                        o.pins.pop(old, None)
                    self._remove(old)
                c = int(c) & 0xFFFFFFFF
                b = Block(e.key, e.tier, e.slot, stamps.get(id(e), c), e.num_tokens,
                          e.partial, owner if e.partial else "")
                if id(e) in stamps:
                    b.device_checksum = c
                elif p.device and not e.tier.on_device:
                    b.device_checksum, b.crc_pending = c, True
                    spilled.append(b)
                blocks[e.key] = b
                stored += 1
                nbytes += e.slot.length
                if o is not None:  # a new block: pinned by its owner only
                    b.pinners.add(owner)
                    o.pins[b] = None
                    if b.private_owner:
                        o.private.add(b)
                else:
                    self._lru_add(b)
            self._s.blocks_stored += stored
            self._s.bytes_stored += nbytes
            self._stamp_later(spilled)
        self.demote_soon()
        return stored, len(p.entries) - stored

    def _pending_put(self, put_id: str) -> PendingPut:
        """The pending put ``put_id`` (the lock held), or NotFound."""
        p = self._pending.get(put_id)
        if p is None:
            raise NotFound(f"no pending put {put_id!r}: it was committed, aborted or "
                           f"expired after {self.pin_ttl_s:g}s; begin the put again")
        return p

    def _await_landing(self, put_id: str, wait_s: float | None,
                       wanted: Callable[[], bool] | None) -> None:
        """Waits until the put's landing token is in its pad: then its copies have
        landed. Gives up, dropping the put, after ``wait_s`` (LANDING_WAIT_S) or when
        ``wanted`` (the caller is still there) stops holding."""
        with self._lock:
            pad = self._pending_put(put_id).pad
        if pad is None or self._pads is None:
            raise InvalidArgument(
                f"put {put_id} has no landing pad (its BeginPut answered landing_offset "
                "0): wait for your copies to land, then commit without landing")
        bound = LANDING_WAIT_S if wait_s is None else wait_s
        pads = self._pads
        if wait_landed(lambda: pads.landed(pad), time.monotonic() + bound,
                       lambda: put_id in self._pending and (wanted is None or wanted())):
            return
        if self.abort_put(put_id):
            with self._lock:
                self._s.landings_missed += 1
            raise DeadlineExceeded(
                f"put {put_id}: its landing token did not come within {bound:g}s (the "
                "writer's copies did not land, or the writer went away); the put was "
                "dropped: put the blocks again")
        raise NotFound(f"put {put_id} was aborted or expired while its copies were "
                       "landing; begin the put again")

    def _host_stamps(self, put_id: str, given: Sequence[int]) -> dict[int, int]:
        """The writer's crc32s of a device put's blocks written into a host tier (a
        spilled put), one per written slot -> id(entry) -> crc32; none given: {} (the
        store stamps them after the commit)."""
        if not given:
            return {}
        with self._lock:
            p = self._pending.get(put_id)
            host = [e for e in p.entries if e.slot is not None and e.tier is not None
                    and not e.tier.on_device] if p is not None and p.device else []
            written = sum(1 for e in p.entries if e.slot is not None) if p else 0
        if not host:
            return {}
        if len(given) != written or len(host) != written:
            raise InvalidArgument(
                f"put {put_id} spilled {len(host)} of {written} written blocks: send "
                f"one host checksum per written block, got {len(given)}")
        return {id(e): int(c) & 0xFFFFFFFF for e, c in zip(host, given, strict=True)}

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

    @staticmethod
    def _replaces(old: Block, e: PutEntry) -> bool:
        """A partial block grows: a re-put with another token count replaces it."""
        return old.partial and e.partial and old.num_tokens != e.num_tokens
