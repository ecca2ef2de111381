"""The KV store's index: which block lives in which tier, who pins it, what moves.

Pure logic over :mod:`kvstore.tiers`, no gRPC, one lock. The server maps its errors
to status codes; the bytes themselves are written and read through ``view``/``read``
by the caller, outside the lock (a pending put, a pin or a move keeps a slot from
being freed). Tiers are fastest first: new blocks land in the first; when it fills,
its least recently used unpinned blocks are demoted down the list and deleted only
from the last (:mod:`kvstore.space`, :mod:`kvstore.moves`). A persistent tier's
blocks are found again at start-up.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from kvstore.demotion import Demotion
from kvstore.landing import LandingPads
from kvstore.moves import Moves
from kvstore.owners import Owners
from kvstore.puts import Puts
from kvstore.space import Space
from kvstore.stamps import Stamps
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
    PutSlot,
    ResourceExhausted,
    StoreError,
    StoreStats,
    TierCounters,
    TierStats,
    check_key,
    hex_keys,
)
from services.transfer.contract.checksum import crc32
from services.transfer.contract.device_checksum import KIND_CRC32

__all__ = [
    "MAX_KEY_BYTES", "BegunPut", "Block", "InvalidArgument", "KVStoreCore", "Location",
    "NotFound", "PutSlot", "ResourceExhausted", "StoreError", "StoreStats", "check_key",
]
SEEN_KEYS = 1 << 16  # keys remembered for the ``admit: seen`` rule


class KVStoreCore(Space, Moves, Demotion, Puts, Owners, Stamps):
    """Index, pins, two-phase puts, demotion (on demand and by watermarks), promotion
    and LRU eviction over a list of tiers (fastest first)."""

    def __init__(self, tiers: Sequence[Tier], pin_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, *,
                 promote_on_get: bool = True) -> None:
        if not tiers:
            raise ValueError("a KV store needs at least one tier")
        self.tiers = list(tiers)
        host = [t for t in tiers if t.has_view]
        if not host:
            raise ValueError("a KV store needs a host memory tier (cpu)")
        self.host = host[0]  # where host writers' puts land, the arena shm readers map
        self.device_tier = next((t for t in tiers if t.on_device), None)
        header = getattr(self.host, "header", None)
        self._pads = LandingPads(header()) if header is not None else None
        self.pin_ttl_s = pin_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)
        self._blocks: dict[bytes, Block] = {}
        self._lru: dict[Tier, OrderedDict[bytes, Block]] = {t: OrderedDict() for t in tiers}
        self._ts: dict[Tier, TierCounters] = {t: TierCounters() for t in tiers}
        self._leaving: dict[Tier, int] = dict.fromkeys(tiers, 0)
        self._lingering: dict[Block, list[tuple[Tier, Slot]]] = {}
        self._rank = {t: i for i, t in enumerate(tiers)}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._track_seen = any(getattr(t, "admit", "all") == "seen" for t in tiers)
        self._owners: dict[str, OwnerState] = {}
        self._pending: dict[str, PendingPut] = {}
        self._next_expiry = float("inf")
        self._s = StoreStats()
        self._promoter = None
        self.promote_on_get = promote_on_get  # a get of a slower tier's block raises it
        for t in self.tiers:
            self._load(t)

    def _load(self, tier: Tier) -> None:
        """Indexes the blocks a persistent tier kept from before (unpinned, shared)."""
        for slot, m in tier.scan():
            if m.key in self._blocks:  # a copy left by a crash mid-move: keep one
                tier.free(slot)
                continue
            b = Block(m.key, tier, slot, m.checksum, m.num_tokens, m.partial)
            self._blocks[m.key] = b
            self._lru_add(b)
        rejected = getattr(tier, "rejected_at_scan", 0)
        self._ts[tier].checksum_failures += rejected
        self._s.checksum_failures += rejected

    # -- reads ------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> tuple[int, dict[str, int]]:
        """Longest prefix of ``keys`` held in any tier, and held in each tier."""
        keys = [check_key(k) for k in keys]
        with self._lock:
            self._expire()
            self._remember(keys)
            held = self._prefix(keys)
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

    def home(self, device: bool) -> int:
        """The index of the tier a writer or a direct reader works in: the gpu tier for
        a device (cuda_ipc) client, the host memory tier for the others."""
        if device:
            if self.device_tier is None:
                raise InvalidArgument("this store has no gpu tier: use a host transport")
            return self._rank[self.device_tier]
        return self._rank[self.host]

    def get(self, owner: str, keys: Sequence[bytes], *, prefix: bool = False,
            memory: bool = False, device: bool = False) -> list[Location]:
        """Pins every block for ``owner`` (none when empty) and says where they are.
        All or nothing: a missing key raises NotFound and pins nothing. With ``prefix``:
        the longest held prefix of ``keys`` instead (possibly none), pinned; nothing
        past it is pinned and a missing key raises nothing. Blocks of slower tiers are
        promoted into the reader's home tier (:meth:`home`) in the background (for a
        device reader that maps the host arena, once it releases them: it reads them in
        place over the link, which the promotion's copy would share); with
        ``memory`` (a reader that maps the host arena, and with ``device`` the gpu arena
        too) the blocks it cannot map are moved home at once, and a block that cannot
        be moved (corrupt, or no room) ends the prefix, or raises NotFound /
        ResourceExhausted."""
        keys = [check_key(k) for k in keys]
        home = self.home(device)
        mapped = {self.host, self.tiers[home]} if memory else set(self.tiers)
        pin_owner = owner or (f"raise-{uuid.uuid4().hex}" if memory else "")
        with self._lock:
            self._expire()
            found, newly = self._find(pin_owner, keys, prefix)
            unmapped = [b for b in found if b.tier not in mapped]
            if not unmapped:
                slower = [b.key for b in found if self._rank[b.tier] > home] \
                    if self.promote_on_get else []
                if slower and device and memory and owner:  # read in place over the link
                    self._owners[owner].promote_on_release.update(dict.fromkeys(slower))
                elif slower:
                    self._queue_promotion(slower, home)
                if device or not any(b.crc_pending for b in found):
                    locs = [self._location(b) for b in found]
                    if pin_owner != owner:
                        self._release(pin_owner)
                    return locs
        if unmapped and (failed := self._raise(unmapped, home, fetch=True)):
            with self._lock:
                found = self._cut(pin_owner, found, newly, failed, prefix, self.tiers[home])
        if not device:  # a host reader verifies crc32s: spilled blocks get theirs now
            self.stamp(found)
        with self._lock:
            locs = [self._location(b) for b in found]
            if pin_owner != owner:
                self._release(pin_owner)
            return locs

    def _find(self, owner: str, keys: list[bytes], prefix: bool) -> tuple[list[Block],
                                                                           set[Block]]:
        """The blocks of ``keys`` (prefix mode: the held prefix), counted and pinned for
        ``owner`` -> (blocks, those this call pinned)."""
        self._remember(keys)
        if prefix:
            found = self._prefix(keys)
            self._count(found, len(keys) - len(found))
        else:
            got = [self._blocks.get(k) for k in keys]
            missing = [k for k, b in zip(keys, got, strict=True) if b is None]
            found = [b for b in got if b is not None]
            self._count(found, len(missing))
            if missing:
                raise NotFound(f"{len(missing)} of {len(keys)} blocks not held: "
                               f"{hex_keys(missing)}", missing)
        newly: set[Block] = set()
        if owner and found:
            newly = set(self._pin_all(self._owner(owner), owner, found))
        elif not owner:
            for b in found:
                if b.key in self._lru[b.tier]:
                    self._lru[b.tier].move_to_end(b.key)
        return found, newly

    def _cut(self, owner: str, found: list[Block], newly: set[Block], failed: set[Block],
             prefix: bool, home: Tier) -> list[Block]:
        """After a failed promotion: the prefix before the first failed block, or an
        error; pins this call took on what is not returned are dropped."""
        i = next(i for i, b in enumerate(found) if b in failed)
        keep = found[:i] if prefix else []
        o = self._owners.get(owner)
        if o is not None:
            self._drop_pins(o, owner, [b for b in found[len(keep):] if b in newly])
        if prefix:
            return keep
        gone = [b.key for b in failed if b.dead]
        if gone:
            raise NotFound(f"{len(gone)} of {len(found)} blocks failed their checksum "
                           f"and were dropped: {hex_keys(gone)}", gone)
        raise ResourceExhausted(
            f"no room in the {home.name} tier to move {len(failed)} blocks held in "
            f"another tier there for a direct read (the {home.name} tier is pinned); "
            f"release owners, retry later, or read them with transfer.transport: grpc")

    def _prefix(self, keys: list[bytes]) -> list[Block]:
        held = []
        for k in keys:
            b = self._blocks.get(k)
            if b is None:
                break
            held.append(b)
        return held

    def _count(self, found: list[Block], missing: int) -> None:
        ts, tiers = self._ts, self.tiers
        self._s.hits += len(found)
        self._s.misses += missing
        for tier, hits in Counter(b.tier for b in found).items():
            ts[tier].hits += hits
            for t in tiers[: self._rank[tier]]:
                ts[t].misses += hits
        if missing:
            for t in tiers:
                ts[t].misses += missing

    def _remember(self, keys: list[bytes]) -> None:
        if not self._track_seen:
            return
        seen = self._seen
        for k in keys:
            seen[k] = None
            seen.move_to_end(k)
        while len(seen) > SEEN_KEYS:
            seen.popitem(last=False)

    @staticmethod
    def _location(b: Block) -> Location:
        dsum = b.checksum if b.tier.on_device else b.device_checksum
        return Location(b.key, b.tier.name, b.slot.offset, b.slot.length, b.checksum, dsum)

    def view(self, loc: Location | PutSlot) -> memoryview:
        """The bytes at a location (read) or a reserved slot (write) of a memory tier."""
        tier = self._tier(loc.tier)
        return tier.view(Slot(loc.offset, loc.length))

    def read(self, loc: Location) -> memoryview:
        """The bytes of a pinned block wherever it is: a view of a memory tier, else a
        copy read from its tier (unverified: check its crc32). A block promoted while
        its file was being opened is read where it went."""
        for _ in range(4):
            tier = self._tier(loc.tier)
            if tier.has_view:
                return tier.view(Slot(loc.offset, loc.length))
            out = memoryview(bytearray(loc.length))
            try:
                tier.read_into(Slot(loc.offset, loc.length), out)
                return out
            except ValueError:  # a bad header: the crc32 check will fail, and count it
                return out
            except FileNotFoundError:
                with self._lock:
                    b = self._blocks.get(loc.key)
                    if b is None or b.checksum != loc.checksum:
                        break
                    loc = self._location(b)
        raise NotFound(f"block {loc.key.hex()} went while being read", [loc.key])

    def check(self, loc: Location) -> bool:
        """Verifies a block's checksum; a block that fails is dropped and counted."""
        return self.verified(loc) is not None

    def verified(self, loc: Location) -> memoryview | None:
        """``read``, checked against the block's checksum (a device tier's on the
        device); None (dropped and counted) when it fails."""
        data = self.read(loc)
        tier = self._tier(loc.tier)
        if tier.has_view or tier.checksum_kind == KIND_CRC32:
            ok = crc32(data) == loc.checksum
        else:
            ok = tier.checksum(Slot(loc.offset, loc.length)) == loc.checksum
        if ok:
            return data
        self.drop_corrupt(loc)
        return None

    def drop_corrupt(self, loc: Location) -> None:
        with self._lock:
            b = self._blocks.get(loc.key)
            tier = self._tier(loc.tier)
            self._s.checksum_failures += 1
            self._ts[tier].checksum_failures += 1
            if b is not None and b.slot.offset == loc.offset and b.tier is tier:
                self._remove(b)

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
            s.moves_pending = self._promotions_queued + self._stamps_queued + sum(
                1 for b in self._blocks.values() if b.moving)
            counts = dict.fromkeys(self.tiers, 0)
            for b in self._blocks.values():
                counts[b.tier] += 1
            s.tiers = [TierStats(**vars(self._ts[t]), name=t.name, kind=t.kind or t.name,
                                 capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes,
                                 blocks=counts[t]) for t in self.tiers]
            return s

    def close(self) -> None:
        self.stop_demoting()
        for q in (self._promoter, self._stamper):
            if q is not None:
                q.put(None)
        if self._pads is not None:
            self._pads.close()  # its view of the arena would keep the mapping open
        for t in self.tiers:
            t.close()

    def _tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise InvalidArgument(f"no tier {name!r}; tiers: {[t.name for t in self.tiers]}")
