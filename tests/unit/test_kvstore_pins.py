"""The store's Pin: an owner keeps a held prefix pinned, with a TTL of its own."""

from __future__ import annotations

import pytest

from kvstore.store import InvalidArgument
from tests.unit.test_kvstore import key, make, put


def test_pin_takes_the_longest_held_prefix_without_reading_it() -> None:
    core, _, _ = make()
    put(core, [0, 1, 2], owner="req")
    core.release("req")
    hits = core.stats().hits
    assert core.pin("session", [key(0), key(1), key("gone"), key(2)]) == 2
    s = core.stats()
    assert (s.pins, s.owners, s.hits) == (2, 1, hits)
    assert core.pin("session", [key(0), key(1), key(2)]) == 3  # grows; no pin twice
    assert core.stats().pins == 3
    assert core.release("session") == 3 and core.stats().pins == 0


def test_an_owner_ttl_of_its_own_outlives_the_store_ttl_and_is_refreshed() -> None:
    core, _, clock = make(ttl=30)
    put(core, [0, 1])
    core.pin("session", [key(0), key(1)], ttl_s=100)
    clock.t += 90
    core.get("session", [key(0)])  # a use keeps the owner's own TTL
    clock.t += 90
    assert core.stats().pins == 2
    clock.t += 11
    s = core.stats()
    assert (s.pins, s.owners, s.blocks) == (0, 0, 2)  # unpinned, still held


def test_a_short_ttl_expires_before_the_store_ttl() -> None:
    core, _, clock = make(ttl=300)
    put(core, [0])
    core.pin("session", [key(0)], ttl_s=2)
    clock.t += 2.5
    assert core.stats().owners == 0


def test_pinning_nothing_held_makes_no_owner() -> None:
    core, _, _ = make()
    assert core.pin("session", [key("never")]) == 0
    assert core.stats().owners == 0


@pytest.mark.parametrize(("owner", "ttl_s", "needle"), [
    ("", 1.0, "needs an owner"),
    ("s", -1.0, "ttl_s must be >= 0"),
    ("s", float("nan"), "ttl_s must be >= 0"),
])
def test_bad_pins_say_what_to_fix(owner: str, ttl_s: float, needle: str) -> None:
    core, _, _ = make()
    with pytest.raises(InvalidArgument, match=needle):
        core.pin(owner, [key(0)], ttl_s)
