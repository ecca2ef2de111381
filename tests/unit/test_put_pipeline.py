"""A put in pipelined chunks (services.transfer.put_pipeline) against a real store over
gRPC: every chunk stored, nothing left pinned or pending; a chunk that fails aborts
itself and the chunk begun ahead, after the copies in flight landed, and the chunks
committed before it stay. Chunks with landing pads are committed before their copies
land, and one whose token never comes fails the put only after the stream was waited
for. The copies land in the store's host tier here, with a stand-in for the CUDA stream
(the GPU path runs in tests/gpu)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kvstore.landing import Pad
from kvstore.store import KVStoreCore
from kvstore.tiers.base import Slot
from kvstore.tiers.cpu import CpuTier
from kvstore.tiers.gpu import GpuTier
from kvstore.types import PutSlot
from services.transfer.arena_ops import begin_put
from services.transfer.contract.arena import LANDING_PADS
from services.transfer.contract.checksum import crc32
from services.transfer.put_pipeline import PutHelpers, chunks, pipelined_put
from splitserve.v1 import common_pb2, kvstore_pb2_grpc
from tests.fixtures.device_puts import dsum, land, write_device_put
from tests.fixtures.store_server import served as serve

NBYTES = 4096


class _Stream:
    """The stream the copies are enqueued on: here they are done when written, or, with
    a ``landed`` gate, once it opens (copies still crossing the link)."""

    def __init__(self, landed: threading.Event | None = None) -> None:
        self.waits = 0
        self.landed = landed

    def record_event(self) -> _Stream:
        return self

    def synchronize(self) -> None:
        if self.landed is not None:
            assert self.landed.wait(timeout=10), "the copies never landed"
        self.waits += 1


@pytest.fixture
def store() -> Iterator[tuple[KVStoreCore, kvstore_pb2_grpc.KVStoreStub, str]]:
    core = KVStoreCore([CpuTier(64 * NBYTES, shm=False)])
    store_id = f"unit-{uuid.uuid4().hex[:6]}"
    with serve(core, store_id) as stub:
        yield core, stub, store_id
    core.close()


def _stale(store_id: str) -> Exception:
    return RuntimeError(f"another store: {store_id}")


def _put(core, stub, store_id, data: list[bytes], pieces: list[range], fail_at: int = -1,
         stream: _Stream | None = None, on_begin=lambda piece: None):
    refs = [common_pb2.BlockRef(key=os.urandom(16), num_tokens=16) for _ in data]

    def begin(piece: range):
        on_begin(piece)
        return begin_put(stub, "owner", refs[piece.start : piece.stop], NBYTES, 10.0,
                         store_id, _stale)

    def write(begun, offsets: list[int], piece: range) -> list[int]:
        if piece.start == fail_at:
            raise OSError("the copy failed")
        for off, d in zip(offsets, data[piece.start : piece.stop], strict=True):
            core.tiers[0].view(Slot(off, NBYTES))[:] = d
        return [crc32(d) for d in data[piece.start : piece.stop]]

    stream = stream or _Stream()
    helpers = PutHelpers.start("test-put")
    try:
        answers = pipelined_put(stub, helpers, pieces, begin, write, stream, 10.0)
    finally:
        helpers.shutdown()
    return refs, answers, stream


def test_chunks_cover_every_block_and_the_last_is_half_as_long():
    assert chunks(292, 1792 << 10) == [range(0, 83), range(83, 167), range(167, 250),
                                       range(250, 292)]
    assert chunks(10, 128 << 20) == [range(i, i + 1) for i in range(10)]
    assert chunks(145, 1792 << 10) == [range(0, 145)]  # under two chunks: one
    assert chunks(3, 4096) == [range(0, 3)]


def test_a_pipelined_put_stores_every_chunk(store):
    core, stub, store_id = store
    data = [os.urandom(NBYTES) for _ in range(10)]
    pieces = [range(0, 4), range(4, 8), range(8, 10)]
    refs, answers, stream = _put(core, stub, store_id, data, pieces)
    assert [a.stored for a in answers] == [4, 4, 2] and stream.waits == 3
    locs = core.get("reader", [r.key for r in refs])
    assert [bytes(core.view(loc)) for loc in locs] == data
    assert all(core.check(loc) for loc in locs)
    core.release("reader")
    core.release("owner")
    s = core.stats()
    assert s.pins == 0 and s.pending_puts == 0 and s.blocks == 10


def test_a_failed_chunk_aborts_itself_and_the_one_begun_ahead(store):
    core, stub, store_id = store
    data = [os.urandom(NBYTES) for _ in range(9)]
    pieces = [range(0, 3), range(3, 6), range(6, 9)]
    with pytest.raises(OSError, match="the copy failed"):
        _put(core, stub, store_id, data, pieces, fail_at=3)
    s = core.stats()
    assert s.pending_puts == 0  # chunk 2 (failed) and chunk 3 (begun ahead) aborted
    assert s.blocks == 3  # chunk 1 was committed and stays
    core.release("owner")
    assert core.stats().pins == 0 and core.tiers[0].used_bytes == 3 * NBYTES


def test_no_begin_waits_behind_commits_waiting_for_their_copies(store):
    """The copies of the first chunks are still crossing (their commits wait) when the
    last chunk is begun: it must be, or the copies that follow it would stall."""
    core, stub, store_id = store
    data = [os.urandom(NBYTES) for _ in range(8)]
    pieces = [range(i, i + 2) for i in range(0, 8, 2)]
    landed = threading.Event()

    def on_begin(piece: range) -> None:
        if piece == pieces[-1]:
            landed.set()  # the copies land only once every chunk is begun

    refs, answers, _ = _put(core, stub, store_id, data, pieces, stream=_Stream(landed),
                            on_begin=on_begin)
    assert [a.stored for a in answers] == [2, 2, 2, 2]
    core.release("owner")
    assert core.stats().pins == 0


# -- landing pads: chunks committed while their copies cross ------------------------------

@pytest.fixture
def spilling() -> Iterator[tuple[KVStoreCore, kvstore_pb2_grpc.KVStoreStub, str]]:
    """A store whose gpu tier (on the CPU) is full of pinned blocks: device puts spill
    into the shared cpu tier and get landing pads."""
    core = KVStoreCore([GpuTier(NBYTES, device="cpu"), CpuTier(64 * NBYTES, shm=True)])
    held = core.begin_put("hold", [common_pb2.BlockRef(key=b"h" * 16, num_tokens=16)],
                          NBYTES, device=True)
    write_device_put(core, held, [bytes(NBYTES)])
    with serve(core, "land") as stub:
        yield core, stub, "land"
    core.close()


class _TokenStream(_Stream):
    """A stream whose copies land when the test says: then each piece's token lands in
    its pad after them, as the device writes it."""

    def __init__(self, core: KVStoreCore) -> None:
        super().__init__()
        self.core = core
        self.tokens: list[tuple[int, int]] = []

    def land(self) -> None:
        for offset, token in self.tokens:
            land(self.core, Pad(offset, token))


def _landing_put(core, stub, store_id, data, pieces, stream: _TokenStream, timeout_s=10.0):
    refs = [common_pb2.BlockRef(key=os.urandom(16), num_tokens=16) for _ in data]

    def begin(piece: range):
        return begin_put(stub, "owner", refs[piece.start : piece.stop], NBYTES, timeout_s,
                         store_id, _stale, device=True, landing=True)

    def write(begun, offsets: list[int], piece: range) -> list[int]:
        assert begun.spilled and begun.landing_offset
        for off, d in zip(offsets, data[piece.start : piece.stop], strict=True):
            core.view(PutSlot(b"", False, off, NBYTES, "cpu"))[:] = d
        stream.tokens.append((begun.landing_offset, begun.landing_token))
        return [dsum(d) for d in data[piece.start : piece.stop]]

    helpers = PutHelpers.start("test-landing")
    try:
        return refs, pipelined_put(stub, helpers, pieces, begin, write, stream, timeout_s)
    finally:
        helpers.shutdown()


def test_chunks_with_landing_pads_commit_before_their_copies_land(spilling):
    core, stub, store_id = spilling
    data = [os.urandom(NBYTES) for _ in range(6)]
    pieces = [range(0, 2), range(2, 4), range(4, 6)]
    stream = _TokenStream(core)
    with ThreadPoolExecutor(1) as pool:
        put = pool.submit(_landing_put, core, stub, store_id, data, pieces, stream)
        deadline = time.monotonic() + 5
        while len(stream.tokens) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert not put.done()  # every commit sent, waiting in the store for its token
        stream.land()
        refs, answers = put.result(timeout=5)
    assert [a.stored for a in answers] == [2, 2, 2]
    assert stream.waits == 0  # the client never waited for its copies
    locs = core.get("reader", [r.key for r in refs])
    assert [bytes(core.view(loc)) for loc in locs] == data
    core.release("reader")
    core.release("owner")
    s = core.stats()
    assert s.pins == 1 and s.pending_puts == 0  # the gpu tier's holder only
    assert core._pads is not None and core._pads.free == LANDING_PADS


def test_a_chunk_whose_token_never_lands_fails_the_put_after_the_stream_is_waited_for(
        spilling):
    core, stub, store_id = spilling
    data = [os.urandom(NBYTES) for _ in range(4)]
    stream = _TokenStream(core)  # lands nothing
    with pytest.raises(grpc.RpcError) as err:
        _landing_put(core, stub, store_id, data, [range(0, 2), range(2, 4)], stream,
                     timeout_s=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stream.waits >= 1  # before any abort freed the slots of a copy in flight
    s = core.stats()
    assert s.pending_puts == 0 and s.pins == 1
    assert core._pads is not None and core._pads.free == LANDING_PADS
