"""The ``ucx`` transport: block bytes as UCX tagged messages, any hosts (RDMA, TCP, or
shared memory, whatever UCX finds between the two), control on gRPC.

One endpoint per (process, store), opened once with a HELLO that names the store
instance. Put: BeginPut reserves arena slots -> the payloads go out from the caller's
buffers and the store receives them straight into those slots -> CommitPut with the
crc32s computed here. Get: Get pins the blocks and says where -> the store sends those
arena spans, received straight into the caller's ``out`` buffers -> crc32s verified
here (a mismatch is re-read over GetBlocks). Requests on one endpoint run one at a time
(UCX matches messages of a tag in order). Any failure of the endpoint (a peer gone, a
link down, a timeout) drops it for good and raises TransportFailure; the client opens
a new transport for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from services.transfer import ucx_loop
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
from services.transfer.bulk import empty
from services.transfer.contract.checksum import crc32
from services.transfer.contract.errors import (
    InvalidRequestError,
    KVStoreError,
    StaleTransportError,
    TransportFailure,
    wrap_rpc_error,
)
from services.transfer.memory import tune_malloc
from services.transfer.metrics import TransferMeter
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

Op = kvstore_pb2.UcxRequest


class UcxUnavailable(OSError):
    """The ucx transport cannot be opened to this store (no ucxx, no listener, no route)."""


def ucx_peer_host(describe: kvstore_pb2.DescribeResponse, grpc_host: str) -> str:
    """The address of the store's listener: its announced host, unless that is a
    wildcard or a name, then the host this client reaches its gRPC port at (resolved:
    UCX connects to addresses)."""
    host = describe.ucx_host
    try:
        if host and not ipaddress.ip_address(host).is_unspecified:
            return host
    except ValueError:  # a name, which may mean another host from here: use gRPC's
        pass
    try:
        return socket.getaddrinfo(grpc_host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise UcxUnavailable(f"cannot resolve the store's host {grpc_host!r}: {e}") from e


class UcxTransport(KVTransport):
    name = "ucx"

    def __init__(self, channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                 host: str, *, timeout_s: float | None = 120.0,
                 connect_timeout_s: float = 5.0, secret: str = "") -> None:
        reason = ucx_loop.unavailable()
        if reason:
            raise UcxUnavailable(reason)
        if not describe.ucx_port:
            raise UcxUnavailable(f"store {describe.store_id} announces no UCX listener")
        tune_malloc()
        self.store_id = describe.store_id
        self.peer = f"{host}:{describe.ucx_port}"
        self.timeout_s = timeout_s
        self._channel = channel
        self._stub = kvstore_pb2_grpc.KVStoreStub(channel)
        self._loop = ucx_loop.loop_thread()
        self._lock = threading.Lock()
        self._ep: Any = None
        try:
            self._ep = self._loop.run(self._connect(host, describe.ucx_port, secret),
                                      connect_timeout_s)
        except KVStoreError:
            raise
        except Exception as e:
            raise UcxUnavailable(f"cannot reach the store's UCX listener at {self.peer}: "
                                 f"{_describe_error(e)}") from e
        self._meter = TransferMeter(self.name)

    async def _connect(self, host: str, port: int, secret: str) -> Any:
        ucxx = ucx_loop.ucxx_module()
        ep = await ucxx.create_endpoint(host, port)
        try:
            await ucx_loop.send_msg(ep, Op(op=Op.HELLO, secret=secret))
            reply = await ucx_loop.recv_msg(ep, kvstore_pb2.UcxReply)
        except BaseException:
            ep.abort()
            raise
        if reply.code or reply.store_id != self.store_id:
            ep.abort()
            if reply.code:
                raise KVStoreError(_code(reply.code), reply.error)
            raise UcxUnavailable(f"the UCX listener at {self.peer} is store {reply.store_id}, "
                                 f"not {self.store_id} (it restarted)")
        return ep

    # -- the endpoint -----------------------------------------------------------------
    def _exchange(self, what: str, coro_fn, *args: Any) -> kvstore_pb2.UcxReply:
        """Runs ``coro_fn(ep, *args)`` on the loop, one request at a time; a broken or
        late endpoint is dropped and raises TransportFailure."""
        with self._lock:
            ep = self._ep
            if ep is None:
                raise TransportFailure(self.name, f"the endpoint to {self.peer} broke earlier")
            try:
                reply = self._loop.run(coro_fn(ep, *args), self.timeout_s)
            except Exception as e:
                self._ep = None
                self._loop.loop.call_soon_threadsafe(_abort, ep)
                raise TransportFailure(self.name, f"{what} with store {self.store_id} at "
                                       f"{self.peer} failed: {_describe_error(e)}") from e
        if reply.store_id != self.store_id:
            raise self._stale(reply.store_id)
        if reply.code:
            raise wrap_rpc_error(KVStoreError(_code(reply.code),
                                              reply.error))
        return reply

    def _stale(self, store_id: str) -> StaleTransportError:
        return StaleTransportError(f"the store restarted: it is {store_id} now, this "
                                   f"transport was opened to {self.store_id}")

    # -- put --------------------------------------------------------------------------
    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
            block_nbytes: int) -> PutResult:
        views = check_payloads(refs, payloads, block_nbytes)
        if not refs:
            return PutResult(0, 0)

        def write(begun: kvstore_pb2.BeginPutResponse, offsets: list[int]) -> list[int]:
            written = [v for o, v in zip(offsets, views, strict=True) if o >= 0]
            if written:
                req = Op(op=Op.PUT, put_id=begun.put_id, lengths=[v.nbytes for v in written])
                self._exchange("put", _put, req, written)
            return [crc32(v) for v in written]

        t0 = time.perf_counter()
        resp, offsets = two_phase_put(self._stub, owner, refs, block_nbytes, self.timeout_s,
                                      self.store_id, self._stale, write)
        written = sum(1 for o in offsets if o >= 0)  # -1: a block the store held already
        self._meter.observe("put", time.perf_counter() - t0, block_nbytes * written)
        return PutResult(resp.stored, resp.present)

    # -- get --------------------------------------------------------------------------
    def get(self, owner: str, keys: Sequence[bytes], out: Sequence[Buffer] | None = None, *,
            longest_prefix: bool = False) -> list[Buffer]:
        outs = output_views(keys, out)
        if not keys:
            return []
        pin_owner = owner or f"ucx-get-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        try:
            offsets, lengths, checksums = pinned_locations(
                self._stub, pin_owner, keys, longest_prefix, bounded(self.timeout_s),
                self.store_id, self._stale)
            m = len(offsets)
            dsts = self._destinations(lengths, outs)
            if m:
                self._exchange("get", _get, Op(op=Op.GET, offsets=offsets, lengths=lengths),
                               dsts)
            results: list[Buffer] = list(out[:m]) if out is not None else list(dsts)
            bad = [i for i, (d, want) in enumerate(zip(dsts, checksums, strict=True))
                   if crc32(d) != want]
            results = reread_bad(self._channel, pin_owner, keys, m, bad, results, outs,
                                 longest_prefix, self.timeout_s)
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        finally:
            release_anonymous(self._stub, owner, pin_owner)
        self._meter.observe("get", time.perf_counter() - t0, sum(lengths))
        return results

    @staticmethod
    def _destinations(lengths: list[int], outs: list[memoryview] | None) -> list[memoryview]:
        if outs is None:
            return [empty(length) for length in lengths]
        for i, length in enumerate(lengths):
            if outs[i].nbytes != length:
                raise InvalidRequestError(f"output buffer {i} has {outs[i].nbytes} bytes; "
                                          f"the block has {length}")
        return outs[: len(lengths)]

    def close(self) -> None:
        with self._lock:
            ep, self._ep = self._ep, None
        if ep is not None:
            self._loop.loop.call_soon_threadsafe(_abort, ep)


async def _put(ep: Any, req: kvstore_pb2.UcxRequest,
               payloads: list[memoryview]) -> kvstore_pb2.UcxReply:
    await ucx_loop.send_msg(ep, req)
    await asyncio.gather(*(ep.send(p) for p in payloads))
    return await ucx_loop.recv_msg(ep, kvstore_pb2.UcxReply)


async def _get(ep: Any, req: kvstore_pb2.UcxRequest,
               dsts: list[memoryview]) -> kvstore_pb2.UcxReply:
    await ucx_loop.send_msg(ep, req)
    reply = await ucx_loop.recv_msg(ep, kvstore_pb2.UcxReply)
    if not reply.code:
        await asyncio.gather(*(ep.recv(d) for d in dsts))
    return reply


def _abort(ep: Any) -> None:
    with contextlib.suppress(Exception):
        ep.abort()


def _code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a numeric code (UNKNOWN if it is none)."""
    for s in grpc.StatusCode:
        if s.value[0] == code:
            return s
    return grpc.StatusCode.UNKNOWN


def _describe_error(e: BaseException) -> str:
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
