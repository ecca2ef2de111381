"""A landed fetch is shared for a while: what the taker can still pin it takes, what the
store let go of since it fetches itself; after the while, nothing is shared."""

from __future__ import annotations

import contextlib
import time

from services.common.shared_fetch import SharedFetches


def test_what_the_taker_cannot_pin_it_fetches_itself() -> None:
    shared = SharedFetches(linger_s=5.0)
    fetched: list[list[bytes]] = []

    def fetch(keys):
        fetched.append(list(keys))
        return [b"payload-" + k for k in keys]

    keys = [b"k1", b"k2", b"k3"]
    assert shared.fetch(keys, 3, fetch, lambda ks: len(ks)) == [b"payload-" + k for k in keys]
    # the store still holds the first block only: the taker pins one, fetches two
    got = shared.fetch(keys, 3, fetch, lambda ks: 1)
    assert got == [b"payload-" + k for k in keys]
    assert [f for f in fetched if f] == [keys, [b"k2", b"k3"]]  # (its own: none)
    assert shared.shared_blocks == 1


def test_after_the_linger_nothing_is_shared() -> None:
    shared = SharedFetches(linger_s=0.05)
    fetched: list[list[bytes]] = []

    def fetch(keys):
        fetched.append(list(keys))
        return list(keys)

    shared.fetch([b"a"], 1, fetch, lambda ks: len(ks))
    deadline = time.monotonic() + 5
    while len(shared) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(shared) == 0
    shared.fetch([b"a"], 1, fetch, lambda ks: len(ks))
    assert fetched == [[b"a"], [b"a"]] and shared.shared_blocks == 0


def test_a_failed_fetch_is_not_kept() -> None:
    shared = SharedFetches(linger_s=5.0)

    def broken(keys):
        raise OSError("store away")

    with contextlib.suppress(OSError):
        shared.fetch([b"a"], 1, broken, lambda ks: len(ks))
    assert len(shared) == 0
