"""The KV store's data types and errors (used by the index, the server and tests)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kvstore.landing import Pad
from kvstore.tiers.base import Slot, Tier

MAX_KEY_BYTES = 64


class StoreError(Exception):
    """A request the store cannot serve; ``code`` names the gRPC status it maps to."""

    code = "INTERNAL"


class InvalidArgument(StoreError):
    code = "INVALID_ARGUMENT"


class NotFound(StoreError):
    code = "NOT_FOUND"

    def __init__(self, message: str, keys: Sequence[bytes] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class ResourceExhausted(StoreError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(StoreError):
    code = "DEADLINE_EXCEEDED"


class RefLike(Protocol):
    key: bytes
    num_tokens: int
    partial: bool


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    tier: Tier
    slot: Slot
    checksum: int
    num_tokens: int = 0
    partial: bool = False
    private_owner: str = ""  # the owner a partial block belongs to ("" -> shared)
    pinners: set[str] = field(default_factory=set)
    dead: bool = False  # dropped from the index; the slot is freed when the last pin goes
    moving: bool = False  # being copied to another tier (kvstore.moves): not a victim
    # a host tier's block: its dsum32 when known (it came from the gpu tier or a device
    # writer), so that a device reader verifies it on the device, not on host threads
    device_checksum: int | None = None
    # a device writer's block spilled into a host tier: ``checksum`` is its dsum32 until
    # its crc32 is stamped (kvstore.stamps)
    crc_pending: bool = False


class Location(NamedTuple):
    key: bytes
    tier: str
    offset: int
    length: int
    checksum: int
    device_checksum: int | None = None  # the block's dsum32, where known


class PutSlot(NamedTuple):
    key: bytes
    present: bool  # already held: nothing to write
    offset: int = 0
    length: int = 0
    tier: str = ""


class BegunPut(NamedTuple):
    put_id: str
    slots: list[PutSlot]
    spilled: bool = False  # a device put reserved in the host memory tier
    pad: Pad | None = None  # where its writer writes its landing token (kvstore.landing)


@dataclass(slots=True)
class PutEntry:
    key: bytes
    num_tokens: int
    partial: bool
    tier: Tier | None = None
    slot: Slot | None = None  # None -> present


@dataclass(slots=True)
class PendingPut:
    owner: str
    entries: list[PutEntry]
    expires_at: float
    device: bool = False  # its checksums are dsum32 (a device writer's)
    pad: Pad | None = None  # its landing pad, given back when it ends


@dataclass(slots=True)
class OwnerState:
    expires_at: float
    # an ordered set: released in pin order, so the blocks of one request enter the LRU
    # together and in order, and are demoted into adjacent slots of the tier below
    # (one DMA for a reader of the run, where a set's order scattered them)
    pins: dict[Block, None] = field(default_factory=dict)
    private: set[Block] = field(default_factory=set)
    ttl_s: float = 0.0  # > 0: its own pin TTL (a session's), else the store's pin_ttl_s
    # blocks a device reader read in place from a host tier: raised into the gpu tier
    # once it lets go (raising them while it reads would share the link with its read)
    promote_on_release: dict[bytes, None] = field(default_factory=dict)  # ordered set


@dataclass(slots=True)
class Move:
    """A copy of ``block`` from ``src`` to ``dst`` planned under the lock, made outside."""

    block: Block
    src: Tier
    src_slot: Slot
    dst: Tier
    dst_slot: Slot
    fetch: bool = False  # for a reader that cannot read the block where it is (under pins)


@dataclass
class TierCounters:
    """Per tier. A Get of a block held in tier i is a hit of i and a miss of every tier
    above it (all tiers miss a block not held). ``promotions``: blocks raised into the
    tier; ``demotions``: blocks moved out of it to the next; ``evictions``: blocks
    deleted from it to make room."""

    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    evictions: int = 0
    checksum_failures: int = 0


@dataclass
class TierStats(TierCounters):
    name: str = ""
    kind: str = ""
    capacity_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0


@dataclass
class StoreStats:
    blocks: int = 0
    pinned_blocks: int = 0
    pins: int = 0
    owners: int = 0
    pending_puts: int = 0
    # blocks queued for, or being copied in, a move between tiers, or waiting for a crc32
    moves_pending: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    puts_refused: int = 0
    # puts committed before their copies landed whose landing token never came (dropped)
    landings_missed: int = 0
    checksum_failures: int = 0
    blocks_stored: int = 0
    bytes_stored: int = 0
    lookups: int = 0
    lookup_keys: int = 0
    lookup_hit_blocks: int = 0
    expired_owners: int = 0
    promotions: int = 0
    demotions: int = 0
    tiers: list[TierStats] = field(default_factory=list)


def check_key(key: object) -> bytes:
    if type(key) is bytes and 0 < len(key) <= MAX_KEY_BYTES:
        return key
    if not isinstance(key, bytes | bytearray) or not 0 < len(key) <= MAX_KEY_BYTES:
        n = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise InvalidArgument(
            f"a block key is 1 to {MAX_KEY_BYTES} bytes (a chained block hash), got {n}"
        )
    return bytes(key)


def hex_keys(keys: Iterable[bytes], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(k.hex()[:16] for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
