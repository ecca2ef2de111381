"""Landing pads: a spilled device put commits before its copies have landed.

The writer's stream writes the put's landing token into its pad (the shared arena's
header) after the copies; the store's commit waits for that token, so the CommitPut no
longer follows the last byte across the link. The store reads only its own shared
memory: a token that never comes ends the commit at its bound and drops the put, a
token that is not the put's is ignored, an abort ends a waiting commit, and every pad
goes back when its put ends, however it ends. Over gRPC the writer is another process
that maps the arena, as a worker's DMA would write it.

The gpu tier runs on the CPU here; two pinned blocks fill it, so device puts spill.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kvstore.landing import LandingPads
from kvstore.store import BegunPut, KVStoreCore
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.gpu import GpuTier
from kvstore.types import DeadlineExceeded, InvalidArgument, NotFound
from services.transfer.contract.arena import LANDING_PADS
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from tests.fixtures.device_puts import dsum, land, write_device_put
from tests.fixtures.store_server import served as serve

BLOCK = 1024
GPU_BLOCKS = 2
CPU_BLOCKS = LANDING_PADS + 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> Iterator[KVStoreCore]:
    store = KVStoreCore([GpuTier(GPU_BLOCKS * BLOCK, device="cpu"),
                         CpuTier(CPU_BLOCKS * BLOCK, shm=True)], pin_ttl_s=60, clock=clock)
    write_device_put(store, begin(store, "hold", keys_from(200, GPU_BLOCKS), landing=False),
                     [payload(200 + i) for i in range(GPU_BLOCKS)])  # the gpu tier, full
    yield store
    store.close()


def keys_from(start: int, n: int) -> list[bytes]:
    return [bytes([start % 256, start // 256]) * 8 for start in range(start, start + n)]


def payload(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


def begin(core: KVStoreCore, owner: str, keys: list[bytes], landing: bool = True
          ) -> BegunPut:
    return core.begin_put(owner, [common_pb2.BlockRef(key=k, num_tokens=16) for k in keys],
                          BLOCK, device=True, landing=landing)


def write_blocks(core: KVStoreCore, begun: BegunPut, first: int) -> list[int]:
    """The copies' bytes in the host arena -> the dsum32s the writer commits."""
    sums = []
    for i, s in enumerate(begun.slots):
        core.view(s)[:] = payload(first + i)
        sums.append(dsum(payload(first + i)))
    return sums


def pads(core: KVStoreCore) -> LandingPads:
    assert core._pads is not None
    return core._pads


def assert_nothing_left(core: KVStoreCore) -> None:
    assert core.stats().pending_puts == 0
    assert pads(core).free == LANDING_PADS


def test_a_landing_commit_waits_for_the_token_then_stores_the_bytes(core: KVStoreCore) -> None:
    keys = keys_from(1, 3)
    begun = begin(core, "w", keys)
    assert begun.spilled and begun.pad is not None
    sums = write_blocks(core, begun, 1)
    with ThreadPoolExecutor(1) as pool:
        commit = pool.submit(core.commit_put, begun.put_id, sums, landing=True, wait_s=5)
        time.sleep(0.2)
        assert not commit.done()  # the copies have not landed: nothing visible yet
        assert core.lookup(keys)[0] == 0
        land(core, begun.pad)
        assert commit.result(timeout=2) == (3, 0)
    for i, loc in enumerate(core.get("r", keys)):
        assert bytes(core.read(loc)) == payload(1 + i)
    core.release("r")
    core.release("w")
    assert_nothing_left(core)


def test_a_commit_whose_token_never_comes_drops_the_put(core: KVStoreCore) -> None:
    used = core.host.used_bytes
    begun = begin(core, "w", keys_from(1, 2))
    sums = write_blocks(core, begun, 1)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="landing token did not come"):
        core.commit_put(begun.put_id, sums, landing=True, wait_s=0.2)
    assert time.monotonic() - t0 < 2
    assert core.stats().landings_missed == 1
    assert core.lookup(keys_from(1, 2))[0] == 0
    assert core.host.used_bytes == used  # its slots are free again
    assert_nothing_left(core)


def test_a_token_that_is_not_the_puts_does_not_commit_it(core: KVStoreCore) -> None:
    begun = begin(core, "w", keys_from(1, 1))
    sums = write_blocks(core, begun, 1)
    land(core, begun.pad, token=begun.pad.token ^ 1)  # a late write of an older put's
    with pytest.raises(DeadlineExceeded):
        core.commit_put(begun.put_id, sums, landing=True, wait_s=0.2)
    assert_nothing_left(core)


def test_an_abort_ends_a_commit_waiting_for_its_token(core: KVStoreCore) -> None:
    begun = begin(core, "w", keys_from(1, 1))
    sums = write_blocks(core, begun, 1)
    with ThreadPoolExecutor(1) as pool:
        commit = pool.submit(core.commit_put, begun.put_id, sums, landing=True, wait_s=10)
        time.sleep(0.1)
        assert core.abort_put(begun.put_id)
        with pytest.raises(NotFound, match="aborted or expired while its copies"):
            commit.result(timeout=2)
    assert_nothing_left(core)


def test_pads_go_only_to_spilled_puts_that_ask(core: KVStoreCore) -> None:
    core.release("hold")  # the gpu tier's blocks may be evicted: no spill
    roomy = begin(core, "w", keys_from(1, 1))
    assert not roomy.spilled and roomy.pad is None
    core.abort_put(roomy.put_id)
    write_device_put(core, begin(core, "hold", keys_from(300, GPU_BLOCKS), landing=False),
                     [payload(i) for i in range(GPU_BLOCKS)])
    unasked = begin(core, "w", keys_from(1, 1), landing=False)
    assert unasked.spilled and unasked.pad is None
    with pytest.raises(InvalidArgument, match="no landing pad"):
        core.commit_put(unasked.put_id, [0], landing=True)
    assert core.stats().pending_puts == 1  # still there: commit it the usual way
    assert core.commit_put(unasked.put_id, write_blocks(core, unasked, 1)) == (1, 0)
    core.release("w")
    assert_nothing_left(core)


def test_every_pad_comes_back_however_its_put_ends(core: KVStoreCore, clock: Clock) -> None:
    begun = [begin(core, f"w{i}", keys_from(10 + i, 1)) for i in range(LANDING_PADS)]
    assert len({b.pad.offset for b in begun}) == LANDING_PADS
    extra = begin(core, "w-extra", keys_from(5, 1))
    assert extra.spilled and extra.pad is None  # all in use: commit after the copies
    core.abort_put(extra.put_id)
    committed, aborted = begun[:40], begun[40:80]
    for i, b in enumerate(committed):
        land(core, b.pad)
        core.commit_put(b.put_id, write_blocks(core, b, 10 + i), landing=True)
    for b in aborted:
        core.abort_put(b.put_id)
    assert pads(core).free == 80
    clock.now += 61  # the rest expire
    core.lookup([])
    assert_nothing_left(core)


# -- over gRPC, the writer in another process ---------------------------------------------

WRITER = f"""
import sys
from services.transfer.shm_transport import _open_arena
name, size, store_id, pad, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
    int(sys.argv[4]), int(sys.argv[5])
arena = _open_arena(name, size, store_id)
for i, off in enumerate(int(x) for x in sys.argv[6:]):
    arena[off : off + {BLOCK}] = bytes([(i + 1) % 251]) * {BLOCK}
arena[pad : pad + 8] = token.to_bytes(8, "little")
arena.close()
"""


@pytest.fixture
def served(core: KVStoreCore) -> Iterator[kvstore_pb2_grpc.KVStoreStub]:
    with serve(core, "landing") as stub:
        yield stub


def _begin_rpc(stub: kvstore_pb2_grpc.KVStoreStub, keys: list[bytes]
               ) -> kvstore_pb2.BeginPutResponse:
    return stub.BeginPut(kvstore_pb2.BeginPutRequest(
        owner="w", blocks=[common_pb2.BlockRef(key=k, num_tokens=16) for k in keys],
        block_nbytes=BLOCK, packed=True, device=True, landing=True), timeout=5)


def test_over_grpc_the_commit_goes_first_and_answers_when_another_process_lands(
        core: KVStoreCore, served: kvstore_pb2_grpc.KVStoreStub) -> None:
    keys = keys_from(1, 3)
    begun = _begin_rpc(served, keys)
    assert begun.spilled and begun.landing_offset and begun.landing_token
    sums = [dsum(payload(1 + i)) for i in range(3)]
    commit = served.CommitPut.future(kvstore_pb2.CommitPutRequest(
        put_id=begun.put_id, checksums=sums, landing=True), timeout=10)
    time.sleep(0.2)
    assert not commit.done()
    tier = core.host
    subprocess.run([sys.executable, "-c", WRITER, tier.shm_name, str(tier.arena_bytes),
                    tier.store_id, str(begun.landing_offset),
                    str(begun.landing_token), *map(str, begun.offsets)],
                   check=True, timeout=60)
    assert commit.result(timeout=5).stored == 3
    got = served.GetBlocks(kvstore_pb2.GetRequest(owner="r", keys=keys), timeout=5)
    data = b"".join(bytes(c.data) for c in got)
    assert data == b"".join(payload(1 + i) for i in range(3))
    core.release("r")
    core.release("w")
    assert_nothing_left(core)


def test_over_grpc_a_token_that_never_comes_is_deadline_exceeded_inside_the_callers_deadline(
        core: KVStoreCore, served: kvstore_pb2_grpc.KVStoreStub) -> None:
    begun = _begin_rpc(served, keys_from(1, 2))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        served.CommitPut(kvstore_pb2.CommitPutRequest(put_id=begun.put_id, checksums=[1, 2],
                                                      landing=True), timeout=0.6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "landing token did not come" in err.value.details()  # the store's answer
    assert time.monotonic() - t0 < 0.6
    assert served.Stats(kvstore_pb2.StatsRequest(), timeout=5).landings_missed == 1
    assert_nothing_left(core)


def test_a_landing_commit_of_a_caller_that_went_away_is_dropped(
        core: KVStoreCore, served: kvstore_pb2_grpc.KVStoreStub) -> None:
    begun = _begin_rpc(served, keys_from(1, 1))
    call = served.CommitPut.future(kvstore_pb2.CommitPutRequest(
        put_id=begun.put_id, checksums=[1], landing=True), timeout=30)
    time.sleep(0.1)
    call.cancel()
    deadline = time.monotonic() + 5
    while core.stats().pending_puts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_nothing_left(core)
