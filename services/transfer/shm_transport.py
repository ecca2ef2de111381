"""The ``shm`` transport: same host, the store's CPU arena mapped into this process.

Put: BeginPut reserves slots -> each payload is copied straight into the arena (one
copy) -> CommitPut with their crc32s. Get: Get pins and says where -> one copy out of
the arena, crc32 verified. No KV bytes pass through gRPC. The copies and crc32s run off
the GIL on a couple of threads (:mod:`services.transfer.bulk`).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import time
import uuid
from collections.abc import Sequence

import grpc

from services.transfer.arena_ops import (
    pinned_locations,
    release_anonymous,
    reread_bad,
    two_phase_put,
)
from services.transfer.base import (
    Buffer,
    KVTransport,
    PutResult,
    bounded,
    check_payloads,
    output_views,
)
from services.transfer.bulk import Copy, address, crc_copy, empty
from services.transfer.contract.arena import arena_header
from services.transfer.contract.errors import (
    InvalidRequestError,
    StaleTransportError,
    wrap_rpc_error,
)
from services.transfer.host_id import host_id
from services.transfer.memory import tune_malloc
from services.transfer.metrics import TransferMeter
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

POPULATE_MAX_BYTES = 8 << 30


class ShmUnavailable(OSError):
    """The store's arena cannot be mapped from here (another host, no shm, ...)."""


def _open_arena(name: str, nbytes: int, store_id: str) -> mmap.mmap:
    if not name or "/" in name:
        raise ShmUnavailable(f"the store exposes no usable shared-memory arena ({name!r})")
    path = f"/dev/shm/{name}"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise ShmUnavailable(f"cannot open {path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ShmUnavailable(f"{path} has {size} bytes, the store said {nbytes}")
        # MAP_POPULATE: map every page now rather than fault them in during a transfer
        # (not for huge arenas, whose page tables would be a cost of their own)
        flags = mmap.MAP_SHARED
        if size <= POPULATE_MAX_BYTES:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags)
    finally:
        os.close(fd)
    expect = arena_header(store_id)
    if mm[: len(expect)] != expect:
        mm.close()
        raise ShmUnavailable(f"{path} is not the arena of store {store_id}")
    return mm


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self, channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                 timeout_s: float | None = 60.0) -> None:
        if describe.host_id and describe.host_id != host_id():
            raise ShmUnavailable(f"the store runs on another host or network namespace "
                                 f"({describe.host_id}, this is {host_id()})")
        if describe.hostname and describe.hostname != socket.gethostname():
            raise ShmUnavailable(f"the store runs on {describe.hostname}, this is "
                                 f"{socket.gethostname()}")
        tune_malloc()
        self._mm = _open_arena(describe.shm_name, describe.shm_bytes, describe.store_id)
        self._arena = memoryview(self._mm)
        self._base_ref = ctypes.c_char.from_buffer(self._mm)  # an export: keeps the map
        self._base = ctypes.addressof(self._base_ref)
        self.store_id = describe.store_id
        self._channel = channel
        self._stub = kvstore_pb2_grpc.KVStoreStub(channel)
        self.timeout_s = timeout_s
        self._meter = TransferMeter(self.name)

    def _span(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self._arena.nbytes:
            raise InvalidRequestError(f"store gave a span past the arena: {offset}+{length}")
        return self._arena[offset : offset + length]

    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
            block_nbytes: int) -> PutResult:
        views = check_payloads(refs, payloads, block_nbytes)
        if not refs:
            return PutResult(0, 0)

        def write(begun: kvstore_pb2.BeginPutResponse, offsets: list[int]) -> list[int]:
            sums = [0] * len(views)  # present blocks: 0 (ignored)
            copies, where = [], []
            for j, (offset, v) in enumerate(zip(offsets, views, strict=True)):
                if offset >= 0:  # else already held: nothing to write
                    self._span(offset, block_nbytes)
                    copies.append(Copy(v, 0, self._base + offset))  # address: by the copier
                    where.append(j)
            # each crc32 is computed just before its copy, which then reads from cache
            for j, crc in zip(where, crc_copy(copies), strict=True):
                sums[j] = crc
            return sums

        t0 = time.perf_counter()
        resp, offsets = two_phase_put(self._stub, owner, refs, block_nbytes, self.timeout_s,
                                      self.store_id, self._stale, write)
        written = sum(1 for o in offsets if o >= 0)  # -1: a block the store held already
        self._meter.observe("put", time.perf_counter() - t0, block_nbytes * written)
        return PutResult(resp.stored, resp.present)

    def _stale(self, store_id: str) -> StaleTransportError:
        return StaleTransportError(f"the store restarted: it is {store_id} now, this "
                                   f"transport mapped the arena of {self.store_id}")

    def get(self, owner: str, keys: Sequence[bytes], out: Sequence[Buffer] | None = None, *,
            longest_prefix: bool = False) -> list[Buffer]:
        outs = output_views(keys, out)
        if not keys:
            return []
        pin_owner = owner or f"shm-get-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        try:
            offsets, lengths, checksums = pinned_locations(
                self._stub, pin_owner, keys, longest_prefix, bounded(self.timeout_s),
                self.store_id, self._stale)
            results: list[Buffer] = []
            copies: list[Copy] = []
            total = 0
            for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
                src = self._span(offset, length)
                if outs is not None:
                    dst = outs[i]
                    if dst.nbytes != length:
                        raise InvalidRequestError(f"output buffer {i} has {dst.nbytes} "
                                                  f"bytes; the block has {length}")
                    results.append(out[i])
                else:  # uninitialized: nothing to zero, every byte is copied over
                    dst = empty(length)
                    results.append(dst)
                # verified just before its copy (from cache); the pin keeps it unchanged
                copies.append(Copy(src, self._base + offset, address(dst)))
                total += length
            crcs = crc_copy(copies)
            bad = [i for i, (c, want) in enumerate(zip(crcs, checksums, strict=True))
                   if c != want]
            results = reread_bad(self._channel, pin_owner, keys, len(offsets), bad, results,
                                 outs, longest_prefix, self.timeout_s)
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        finally:
            release_anonymous(self._stub, owner, pin_owner)
        self._meter.observe("get", time.perf_counter() - t0, total)
        return results

    def close(self) -> None:
        # a view a caller still holds keeps the mapping; it goes with the process
        self._base_ref = None
        with contextlib.suppress(BufferError):
            self._arena.release()
            self._mm.close()
