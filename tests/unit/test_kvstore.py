"""The KV store's index (kvstore.store): pure logic over a CPU tier, no gRPC."""

from __future__ import annotations

import os
import random
import threading

import pytest

from kvstore.store import (
    MAX_KEY_BYTES,
    InvalidArgument,
    KVStoreCore,
    NotFound,
    ResourceExhausted,
)
from kvstore.tiers.cpu import CpuTier
from services.transfer.contract.checksum import crc32
from splitserve.v1 import common_pb2

BLOCK = 1024


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def key(i: int | str) -> bytes:
    return f"key-{i}".encode().ljust(16, b".")


def ref(i: int | str, partial: bool = False, num_tokens: int = 16) -> common_pb2.BlockRef:
    return common_pb2.BlockRef(key=key(i), num_tokens=num_tokens, partial=partial)


def payload(i: int | str, n: int = BLOCK) -> bytes:
    seed = f"{i}".encode()
    return (seed * (n // len(seed) + 1))[:n]


def make(blocks: int = 16, ttl: float = 60.0, block: int = BLOCK):
    clock = Clock()
    tier = CpuTier(blocks * block, shm=False)
    return KVStoreCore([tier], pin_ttl_s=ttl, clock=clock), tier, clock


def put(core: KVStoreCore, ids, owner: str = "", n: int = BLOCK, partial: bool = False):
    ids = list(ids)
    return core.put(owner, [ref(i, partial) for i in ids], [payload(i, n) for i in ids], n)


def read(core: KVStoreCore, ids, owner: str = "") -> list[bytes]:
    return [bytes(core.view(loc)) for loc in core.get(owner, [key(i) for i in ids])]


def assert_accounting(core: KVStoreCore, tier: CpuTier) -> None:
    """Every used byte of the tier belongs to a held block or a pending put."""
    with core._lock:
        live = {id(b): b for b in core._blocks.values()}
        for o in core._owners.values():
            live.update({id(b): b for b in o.pins})
        used = sum(tier.footprint(b.slot.length) for b in live.values())
        used += sum(tier.footprint(e.slot.length) for p in core._pending.values()
                    for e in p.entries if e.slot is not None)
    assert tier.used_bytes == used


# -- lookup -----------------------------------------------------------------------------
def test_lookup_is_the_longest_held_prefix():
    core, tier, _ = make()
    put(core, [0, 1, 2])
    assert core.lookup([key(0), key(1), key(2), key(3)]) == (3, {"cpu": 3})
    assert core.lookup([key(0), key(9), key(2)])[0] == 1  # a hole ends the prefix
    assert core.lookup([key(9), key(0)])[0] == 0
    assert core.lookup([])[0] == 0
    assert core.lookup([key(1), key(2)])[0] == 2  # any held run counts from its start


def test_keys_are_validated():
    core, _, _ = make()
    for bad in (b"", b"x" * (MAX_KEY_BYTES + 1)):
        with pytest.raises(InvalidArgument, match="1 to 64 bytes"):
            core.lookup([bad])
        with pytest.raises(InvalidArgument):
            core.begin_put("", [common_pb2.BlockRef(key=bad)], BLOCK)
        with pytest.raises(InvalidArgument):
            core.get("o", [bad])
    core.lookup([b"x" * MAX_KEY_BYTES])
    with pytest.raises(InvalidArgument, match="block_nbytes"):
        core.begin_put("", [ref(0)], 0)


# -- two-phase put ----------------------------------------------------------------------
def test_an_uncommitted_put_is_invisible_until_commit():
    core, tier, _ = make()
    begun = core.begin_put("", [ref(0), ref(1)], BLOCK)
    assert [s.present for s in begun.slots] == [False, False]
    for s, i in zip(begun.slots, (0, 1), strict=True):
        core.view(s)[:] = payload(i)
    assert core.lookup([key(0)])[0] == 0
    with pytest.raises(NotFound):
        core.get("o", [key(0)])
    assert core.stats().blocks == 0
    assert core.commit_put(begun.put_id, [crc32(payload(0)), crc32(payload(1))]) == (2, 0)
    assert core.lookup([key(0), key(1)])[0] == 2
    assert read(core, [0, 1]) == [payload(0), payload(1)]
    assert_accounting(core, tier)


def test_abort_frees_the_reserved_slots():
    core, tier, _ = make()
    begun = core.begin_put("o", [ref(0), ref(1)], BLOCK)
    assert tier.used_bytes == 2 * BLOCK
    assert core.abort_put(begun.put_id)
    assert tier.used_bytes == 0
    assert core.lookup([key(0)])[0] == 0
    with pytest.raises(NotFound, match="no pending put"):
        core.commit_put(begun.put_id, [0, 0])


def test_commit_checks_the_checksum_count():
    core, _, _ = make()
    put(core, [0])
    begun = core.begin_put("", [ref(0), ref(1), ref(2)], BLOCK)  # 0 present
    with pytest.raises(InvalidArgument, match="3 slots"):
        core.commit_put(begun.put_id, [1])
    # one per slot, or one per written slot, are both accepted
    assert core.commit_put(begun.put_id, [crc32(payload(1)), crc32(payload(2))]) == (2, 1)


def test_a_present_key_is_reported_and_not_rewritten():
    core, tier, _ = make()
    put(core, [0])
    begun = core.begin_put("", [ref(0), ref(1), ref(1)], BLOCK)
    assert [s.present for s in begun.slots] == [True, False, True]  # a repeat is present too
    core.view(begun.slots[1])[:] = payload(1)
    assert core.commit_put(begun.put_id, [0, crc32(payload(1)), 0]) == (1, 2)
    assert read(core, [0, 1]) == [payload(0), payload(1)]
    assert put(core, [0, 1]) == (0, 2)
    assert_accounting(core, tier)


def test_racing_puts_of_one_key_store_it_once():
    core, tier, _ = make()
    a = core.begin_put("", [ref(0)], BLOCK)
    b = core.begin_put("", [ref(0)], BLOCK)  # not present yet: both reserve
    for p in (a, b):
        core.view(p.slots[0])[:] = payload(0)
    assert core.commit_put(a.put_id, [crc32(payload(0))]) == (1, 0)
    assert core.commit_put(b.put_id, [crc32(payload(0))]) == (0, 1)
    assert core.stats().blocks == 1
    assert_accounting(core, tier)


def test_pending_puts_expire_and_free_their_slots():
    core, tier, clock = make(ttl=10)
    begun = core.begin_put("o", [ref(0)], BLOCK)
    clock.t += 11
    core.expire()
    assert tier.used_bytes == 0
    with pytest.raises(NotFound):
        core.commit_put(begun.put_id, [0])


# -- pins -------------------------------------------------------------------------------
def test_get_pins_for_the_owner_and_release_unpins():
    core, tier, _ = make()
    put(core, [0, 1, 2])
    assert core.stats().pinned_blocks == 0
    core.get("r1", [key(0), key(1)])
    core.get("r2", [key(1)])
    s = core.stats()
    assert (s.pinned_blocks, s.pins, s.owners, s.hits) == (2, 3, 2, 3)
    assert core.release("r1") == 2
    s = core.stats()
    assert (s.pinned_blocks, s.pins, s.owners) == (1, 1, 1)
    assert core.release("r2") == 1
    assert core.release("r2") == 0  # twice is harmless
    s = core.stats()
    assert (s.pinned_blocks, s.pins, s.owners, s.blocks) == (0, 0, 0, 3)


def test_a_get_with_a_missing_key_pins_nothing():
    core, _, _ = make()
    put(core, [0])
    with pytest.raises(NotFound, match="1 of 2 blocks") as e:
        core.get("r", [key(0), key(5)])
    assert e.value.keys == [key(5)]
    s = core.stats()
    assert (s.pins, s.owners, s.hits, s.misses) == (0, 0, 1, 1)


def test_get_prefix_pins_only_the_longest_held_prefix():
    core, tier, _ = make()
    put(core, [0, 1, 2, 4])
    locs = core.get("r", [key(0), key(1), key(3), key(4)], prefix=True)  # a hole at 3
    assert [loc.key for loc in locs] == [key(0), key(1)]
    assert [bytes(core.view(loc)) for loc in locs] == [payload(0), payload(1)]
    s = core.stats()
    assert (s.pinned_blocks, s.pins, s.owners, s.hits, s.misses) == (2, 2, 1, 2, 2)
    assert len(core.get("r2", [key(i) for i in range(3)], prefix=True)) == 3  # all held
    assert core.get("r3", [key(9), key(0)], prefix=True) == []  # none held
    s = core.stats()
    assert (s.pins, s.owners) == (5, 2)  # r3 pinned nothing and holds no state
    assert core.release("r") == 2
    assert core.release("r2") == 3
    assert core.release("r3") == 0
    assert core.stats().pins == 0
    assert core.get("r", [], prefix=True) == []
    with pytest.raises(InvalidArgument):  # every key is checked, past the prefix too
        core.get("r", [key(0), b""], prefix=True)
    assert_accounting(core, tier)


def test_unpin_drops_only_the_named_pins():
    core, tier, _ = make()
    put(core, [0, 1, 2])
    put(core, ["tail"], owner="r", partial=True)
    core.get("r", [key(0), key(1), key(2)])
    assert core.unpin("r", [key(1), key(2), key(7)]) == 2
    s = core.stats()
    assert (s.pins, s.owners) == (2, 1)  # key 0 and the private tail
    assert core.unpin("nobody", [key(0)]) == 0
    # an unpinned block is evictable again; a dead one is freed with its last pin
    loc = core.get("r", [key(1)])[0]
    core.drop_corrupt(loc)
    assert core.unpin("r", [key(1)]) == 1
    assert core.lookup([key("tail")])[0] == 1  # private blocks wait for release
    assert core.release("r") == 2
    assert core.lookup([key("tail")])[0] == 0
    assert_accounting(core, tier)


def test_put_with_an_owner_pins_new_and_present_blocks():
    core, _, _ = make()
    put(core, [0])
    put(core, [0, 1], owner="req")
    s = core.stats()
    assert (s.pinned_blocks, s.pins, s.owners) == (2, 2, 1)
    core.release("req")
    assert core.stats().blocks == 2  # full blocks stay, unpinned


def test_pins_expire_when_never_released():
    core, _, clock = make(ttl=30)
    put(core, [0], owner="dead-worker")
    put(core, ["tail"], owner="dead-worker", partial=True)
    core.get("dead-worker", [key(0)])
    clock.t += 20
    core.get("live", [key(0)])  # refreshes "live" only
    clock.t += 15
    s = core.stats()
    assert (s.owners, s.pins) == (1, 1)  # dead-worker expired, live not yet
    assert core.lookup([key("tail")])[0] == 0  # its private tail went with it
    assert core.lookup([key(0)])[0] == 1
    clock.t += 31
    assert core.stats().owners == 0


def test_an_owner_touching_its_pins_keeps_them():
    core, _, clock = make(ttl=30)
    put(core, [0], owner="r")
    for _ in range(5):
        clock.t += 20
        core.get("r", [key(0)])
    assert core.stats().pins == 1


def test_release_deletes_private_partial_blocks():
    core, tier, _ = make()
    put(core, [0], owner="r")
    put(core, ["tail"], owner="r", partial=True)
    assert core.stats().blocks == 2
    core.release("r")
    assert core.lookup([key("tail")])[0] == 0
    assert core.lookup([key(0)])[0] == 1
    assert tier.used_bytes == BLOCK
    assert_accounting(core, tier)


def test_a_private_block_pinned_by_another_owner_lives_until_it_lets_go():
    core, tier, _ = make()
    put(core, ["tail"], owner="r", partial=True)
    loc = core.get("migrated", [key("tail")])[0]
    core.release("r")
    assert core.lookup([key("tail")])[0] == 0  # deleted for everyone else...
    assert bytes(core.view(loc)) == payload("tail")  # ...but the reader's bytes stay put
    assert tier.used_bytes == BLOCK
    core.release("migrated")
    assert tier.used_bytes == 0


def test_a_growing_partial_block_replaces_the_old_one():
    core, tier, _ = make()
    core.put("r", [ref("tail", partial=True, num_tokens=3)], [payload("a")], BLOCK)
    assert core.put("r", [ref("tail", partial=True, num_tokens=3)], [payload("b")],
                    BLOCK) == (0, 1)
    assert core.put("r", [ref("tail", partial=True, num_tokens=5)], [payload("c")],
                    BLOCK) == (1, 0)
    assert bytes(core.view(core.get("r", [key("tail")])[0])) == payload("c")
    assert tier.used_bytes == BLOCK
    assert core.stats().pins == 1
    assert_accounting(core, tier)


# -- eviction ---------------------------------------------------------------------------
def test_lru_eviction_makes_room_and_never_evicts_pinned_blocks():
    core, tier, _ = make(blocks=4)
    put(core, ["p0", "p1"], owner="reader")  # pinned
    put(core, [0, 1])  # unpinned, 0 older than 1
    core.get("", [key(0)])  # an unpinned get touches: now 1 is the oldest
    assert put(core, [2]) == (1, 0)
    assert core.lookup([key(1)])[0] == 0
    assert core.lookup([key(0)])[0] == 1
    assert put(core, [3]) == (1, 0)
    assert core.lookup([key(0)])[0] == 0
    for p in ("p0", "p1"):
        assert core.lookup([key(p)])[0] == 1
    assert core.stats().evictions == 2
    assert read(core, ["p0", "p1"]) == [payload("p0"), payload("p1")]
    assert_accounting(core, tier)


def test_a_large_put_evicts_the_oldest_blocks_at_once():
    core, tier, _ = make(blocks=8)
    put(core, range(8))  # full, unpinned; 0 is the oldest
    core.get("", [key(1)])  # touched: 1 is the newest now
    assert put(core, range(10, 13)) == (3, 0)
    assert core.stats().evictions == 3
    held = [i for i in range(8) if core.lookup([key(i)])[0]]
    assert held == [1, 4, 5, 6, 7]  # 0, 2 and 3 went (LRU first); 1 was touched
    assert read(core, range(10, 13)) == [payload(i) for i in range(10, 13)]
    assert_accounting(core, tier)


def test_released_blocks_become_evictable():
    core, _, _ = make(blocks=2)
    put(core, [0, 1], owner="r")
    with pytest.raises(ResourceExhausted):
        put(core, [2])
    core.release("r")
    assert put(core, [2, 3]) == (2, 0)


def test_a_put_that_cannot_fit_is_refused_and_changes_nothing():
    core, tier, _ = make(blocks=4)
    put(core, [0, 1, 2], owner="r")
    put(core, [3])  # unpinned
    with pytest.raises(ResourceExhausted, match=r"needs 2048 bytes .* 0 of 4096 bytes are free"):
        put(core, [4, 5])
    s = core.stats()
    assert (s.puts_refused, s.evictions, s.blocks) == (1, 0, 4)  # nothing evicted in vain
    assert core.lookup([key(3)])[0] == 1
    with pytest.raises(ResourceExhausted):
        put(core, [4], n=5 * BLOCK)  # larger than the whole tier
    assert_accounting(core, tier)
    assert put(core, [4]) == (1, 0)  # what fits still fits (evicts 3)


def test_a_put_does_not_evict_its_own_present_blocks():
    core, _, _ = make(blocks=2)
    put(core, [0, 1])
    with pytest.raises(ResourceExhausted):
        put(core, [0, 1, 2])
    assert core.lookup([key(0), key(1)])[0] == 2


def test_a_refused_put_lets_go_of_the_held_blocks_it_pinned():
    core, _, _ = make(blocks=2)
    put(core, [0], owner="a")
    put(core, [1], owner="r")
    with pytest.raises(ResourceExhausted):
        put(core, [0, 1, 2], owner="r")  # 0 is held (by a): r pins it, then is refused
    assert core.stats().pins == 2  # a's on 0 and r's on 1, as before the put
    core.release("a")
    core.release("r")
    assert core.stats().pins == 0
    assert put(core, [2, 3]) == (2, 0)  # nothing is left pinned in the way


# -- checksums --------------------------------------------------------------------------
def test_a_block_that_fails_its_checksum_is_a_miss():
    core, tier, _ = make()
    put(core, [0, 1])
    loc = core.get("r", [key(0)])[0]
    assert core.check(loc)
    core.view(loc)[10] ^= 0xFF
    assert not core.check(loc)
    assert core.lookup([key(0), key(1)])[0] == 0
    with pytest.raises(NotFound):
        core.get("r2", [key(0)])
    assert core.stats().checksum_failures == 1
    core.release("r")
    assert tier.used_bytes == BLOCK
    assert_accounting(core, tier)


# -- sizes, tiers, threads --------------------------------------------------------------
def test_blocks_of_different_sizes_share_one_arena():
    core, tier, _ = make(blocks=64)
    sizes = {"small": 100, "page": 4096, "odd": 5000, "big": 20000}
    for name, n in sizes.items():
        core.put("", [ref(name)], [payload(name, n)], n)
    for name, n in sizes.items():
        loc = core.get("", [key(name)])[0]
        assert loc.length == n and bytes(core.view(loc)) == payload(name, n)
    assert_accounting(core, tier)


def test_cpu_tier_in_shared_memory_is_unlinked_on_close():
    tier = CpuTier(1 << 20, shm=True, store_id="test-store")
    path = f"/dev/shm/{tier.shm_name}"
    assert os.path.exists(path)
    assert os.path.getsize(path) == tier.arena_bytes
    slot = tier.allocate(4096)
    tier.view(slot)[:4] = b"abcd"
    with open(path, "rb") as f:
        f.seek(slot.offset)
        assert f.read(4) == b"abcd"
        f.seek(0)
        assert f.read(64).startswith(b"SPLITSERVE-KV-ARENA\x00test-store\x00")
    tier.free(slot)
    tier.close()
    assert not os.path.exists(path)


def test_threads_putting_getting_and_releasing_keep_the_books_straight():
    core, tier, _ = make(blocks=48)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        try:
            for n in range(150):
                owner = f"w{w}-{n % 3}"
                ids = [rng.randrange(40) for _ in range(rng.randrange(1, 4))]
                try:
                    put(core, ids, owner=owner if rng.random() < 0.5 else "")
                    got = read(core, ids, owner=owner)
                    assert got == [payload(i) for i in ids]
                except (ResourceExhausted, NotFound):
                    pass
                if rng.random() < 0.3:
                    core.release(owner)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert_accounting(core, tier)
    for w in range(4):
        for n in range(3):
            core.release(f"w{w}-{n}")
    s = core.stats()
    assert (s.pins, s.owners, s.pinned_blocks) == (0, 0, 0)
    assert_accounting(core, tier)


def test_release_quietly_survives_an_unreachable_store() -> None:
    from services.common.launcher import free_port
    from services.transfer.store_client import KVStoreClient

    with KVStoreClient(f"127.0.0.1:{free_port()}", timeout_s=2.0) as client:
        assert client.release_quietly("some-request") is False
