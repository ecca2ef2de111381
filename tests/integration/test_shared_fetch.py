"""The connector of one worker against a real store. Two requests that load the same
prefix at the same time: the store hands it out once, both get its bytes, and each
holds its own pins until released. Prefix blocks the engine is computing for another
request are not asked of the store (they reach the engine first); they are asked
again once that has expired, and whatever lies beyond them is asked."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from services.common.kv_connector import KVConnector
from services.common.server import wait_until
from services.common.settings import TransferSettings
from services.transfer.store_client import KVStoreClient
from tests.integration.test_transfer import start_store

NBYTES = 64 * 1024
SHARED = 8


@pytest.fixture
def client(tmp_path: Path):
    settings, cluster = start_store(tmp_path, ucx=False)
    c = KVStoreClient(settings.kvstore.address, TransferSettings(transport="shm"))
    yield c
    c.close()
    cluster.stop()


def _a_then_b(load, own: tuple[int, int], entered: threading.Event, gate: threading.Event,
              b_asked) -> None:
    """Request a starts loading and is held in its fetch; b starts; once b has asked
    the store for its own blocks, a's fetch goes on; both end."""
    a = threading.Thread(target=load, args=("a", own[0]))
    a.start()
    assert entered.wait(10)
    b = threading.Thread(target=load, args=("b", own[1]))
    b.start()
    while not b_asked():
        threading.Event().wait(0.01)
    gate.set()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()


def test_a_prefix_loaded_by_two_requests_at_once_is_fetched_once(client) -> None:
    keys = [os.urandom(16) for _ in range(SHARED + 2)]
    data = [os.urandom(NBYTES) for _ in keys]
    client.put("writer", keys, data, NBYTES)
    client.release("writer")  # held, unpinned: only the loads pin them now
    kv = KVConnector(client, lambda hashes: 0, 16, NBYTES, pinned_staging=False)
    fetched: dict[str, list[int]] = {}
    entered, gate = threading.Event(), threading.Event()
    real = kv._fetch

    def gated(owner: str, ks, prefix: bool):  # holds a's fetch open until b has asked
        fetched.setdefault(owner, []).append(len(ks))
        if owner == "a":
            entered.set()
            assert gate.wait(10)
        return real(owner, ks, prefix)

    kv._fetch = gated  # type: ignore[method-assign]
    loads: dict[str, object] = {}

    def load(owner: str, own: int) -> None:
        loads[owner] = kv.load_exact(owner, keys[:SHARED] + [keys[own]], SHARED,
                                     (SHARED + 1) * 16)

    # b fetches its own block, then waits for a's prefix
    _a_then_b(load, (SHARED, SHARED + 1), entered, gate, lambda: "b" in fetched)
    assert fetched == {"a": [SHARED + 1], "b": [1]}  # the prefix left the store once
    for owner, own in (("a", SHARED), ("b", SHARED + 1)):
        got = [bytes(memoryview(p.numpy())) for p in loads[owner].payloads]
        assert got == data[:SHARED] + [data[own]]
    assert kv._shared.shared_blocks == SHARED
    assert client.stats().pins == 2 * (SHARED + 1)  # b pinned the prefix for itself
    client.release("a")
    client.release("b")
    assert client.stats().pins == 0


def test_a_failed_shared_fetch_is_made_again_by_the_waiting_request(client) -> None:
    keys = [os.urandom(16) for _ in range(3)]
    client.put("writer", keys[1:], [os.urandom(NBYTES) for _ in keys[1:]], NBYTES)
    kv = KVConnector(client, lambda hashes: 0, 16, NBYTES, pinned_staging=False)
    entered, gate = threading.Event(), threading.Event()
    real = kv._fetch
    tries: list[str] = []

    def gated(owner: str, ks, prefix: bool):
        tries.append(owner)
        if owner == "a" and len(tries) == 1:
            entered.set()
            assert gate.wait(10)
        return real(owner, ks, prefix)

    kv._fetch = gated  # type: ignore[method-assign]
    errors: dict[str, BaseException] = {}

    def load(owner: str, own: int) -> None:
        try:
            kv.load_exact(owner, [keys[0], keys[own]], 1, 32)
        except Exception as e:  # noqa: BLE001
            errors[owner] = e

    _a_then_b(load, (1, 2), entered, gate, lambda: "b" in tries)
    assert set(errors) == {"a", "b"}  # the block is missing for both: NOT_FOUND, no hang
    assert all(isinstance(e, KeyError) for e in errors.values())
    assert tries.count("b") == 2  # b's own block, then the prefix a failed to get
    client.release("a")
    client.release("b")
    client.release("writer")
    assert client.stats().pins == 0


def _counting(kv: KVConnector) -> list[int]:
    """Every store fetch the connector makes: the number of keys it asked for."""
    asked: list[int] = []
    real = kv._fetch

    def fetch(owner: str, keys, prefix: bool):
        asked.append(len(keys))
        return real(owner, keys, prefix)

    kv._fetch = fetch  # type: ignore[method-assign]
    return asked


def test_a_prefix_being_computed_is_not_asked_of_the_store(client) -> None:
    held = [os.urandom(16) for _ in range(2)]
    client.put("writer", held, [os.urandom(NBYTES) for _ in held], NBYTES)
    prefix = held + [os.urandom(16) for _ in range(6)]
    kv = KVConnector(client, lambda hashes: 0, 16, NBYTES, pinned_staging=False)
    now = [0.0]
    kv.computing._clock = lambda: now[0]
    asked = _counting(kv)

    first = kv.load_prefix("a", prefix)  # the store has 2 blocks: a computes the other 6
    assert (first.store_blocks, asked) == (2, [8])
    second = kv.load_prefix("b", prefix + [os.urandom(16)])
    assert (second.store_blocks, second.engine_blocks, asked) == (2, 0, [8, 9])
    other = kv.load_prefix("c", prefix[2:])  # starts where a computes: nothing asked
    assert (other.store_blocks, other.num_tokens, asked) == (0, 0, [8, 9])

    now[0] += kv.computing.ttl_s + 1  # a died before computing them: ask again
    assert kv.load_prefix("d", prefix[2:]).store_blocks == 0
    assert asked == [8, 9, 6]
    for owner in ("a", "b", "c", "d", "writer"):
        client.release(owner)
    assert client.stats().pins == 0


def test_blocks_the_engine_holds_are_neither_asked_nor_marked(client) -> None:
    hashes = [os.urandom(16) for _ in range(4)]
    kv = KVConnector(client, lambda hs: len(hs), 16, NBYTES, pinned_staging=False)
    asked = _counting(kv)
    load = kv.load_prefix("a", hashes)
    assert (load.engine_blocks, load.store_blocks, asked, len(kv.computing)) == (4, 0, [], 0)


def test_a_landed_fetch_is_taken_by_a_request_just_after_it(client) -> None:
    """b comes after a's fetch landed, before a's engine could name the blocks: it takes
    a's payloads (and pins them for itself); once the fetch has lingered its while, a
    later request fetches from the store again."""
    keys = [os.urandom(16) for _ in range(SHARED + 3)]
    data = [os.urandom(NBYTES) for _ in keys]
    client.put("writer", keys, data, NBYTES)
    client.release("writer")
    kv = KVConnector(client, lambda hashes: 0, 16, NBYTES, pinned_staging=False)
    asked = _counting(kv)

    def load(owner: str, own: int):
        return kv.load_exact(owner, keys[:SHARED] + [keys[own]], SHARED, (SHARED + 1) * 16)

    load("a", SHARED)
    b = load("b", SHARED + 1)
    assert asked == [SHARED + 1, 1]  # b asked the store for its own block only
    got = [bytes(memoryview(p.numpy())) for p in b.payloads]
    assert got == data[:SHARED] + [data[SHARED + 1]]
    assert kv._shared.shared_blocks == SHARED
    assert client.stats().pins == 2 * (SHARED + 1)
    assert wait_until(lambda: len(kv._shared) == 0, timeout_s=5)  # lingered, let go
    load("c", SHARED + 2)
    assert asked == [SHARED + 1, 1, SHARED + 1]
    for owner in ("a", "b", "c"):
        client.release(owner)
    assert client.stats().pins == 0
