"""The store's side of the ``ucx`` transport: a UCX listener whose endpoints move block
bytes straight between the wire and the CPU arena.

It moves bytes only where gRPC said: a PUT names a pending BeginPut, whose reserved
slots (looked up here, never taken from the peer) receive the payloads in slot order;
a GET names arena spans that a gRPC ``Get`` pinned, each checked to lie inside the
arena. A peer proves it belongs to the cluster (its secret) in its HELLO before
anything else. The listener runs on the process's UCX loop (``services.transfer.ucx_loop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import Any

import grpc

from kvstore.store import KVStoreCore
from kvstore.tiers.base import Slot
from kvstore.tiers.cpu import CpuTier
from services.common.auth import cluster_secret
from services.common.logging import get_logger
from services.common.settings import ClusterSettings
from services.transfer import ucx_loop
from splitserve.v1 import kvstore_pb2

log = get_logger("kvstore-ucx")
Op = kvstore_pb2.UcxRequest
Reply = kvstore_pb2.UcxReply
DRAIN_BYTES = 1 << 20


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class UcxListener:
    """Accepts workers' endpoints and serves their PUT/GET requests, one at a time per
    endpoint (endpoints run concurrently on the loop)."""

    def __init__(self, core: KVStoreCore, tier: CpuTier, store_id: str,
                 secret: str | None) -> None:
        self.core, self.tier, self.store_id = core, tier, store_id
        self._secret = secret or ""
        self._listener: Any = None
        self.port = 0
        from kvstore.server import STORE_BYTES  # the server imports this module
        self._put_bytes = STORE_BYTES.labels("ucx", "put")
        self._get_bytes = STORE_BYTES.labels("ucx", "get")

    def start(self, port: int) -> UcxListener:
        loop = ucx_loop.loop_thread()

        async def create() -> Any:
            return ucx_loop.ucxx_module().create_listener(self._serve, port=port)

        self._listener = loop.run(create(), 30.0)
        self.port = self._listener.port
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            ucx_loop.loop_thread().loop.call_soon_threadsafe(listener.close)

    async def _serve(self, ep: Any) -> None:
        authed = not self._secret
        try:
            while True:
                req = await ucx_loop.recv_msg(ep, Op)
                try:
                    if req.op == Op.HELLO:
                        authed = authed or hmac.compare_digest(req.secret, self._secret)
                        if not authed:
                            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                                           "the store's UCX listener needs the cluster "
                                           "secret (SPLITSERVE_CLUSTER_SECRET)")
                    elif not authed:
                        raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "HELLO first")
                    elif req.op == Op.PUT:
                        await self._put(ep, req)
                    elif req.op == Op.GET:
                        spans = self._spans(req)  # refused before any byte goes out
                        await ucx_loop.send_msg(ep, Reply(store_id=self.store_id))
                        await asyncio.gather(*(ep.send(v) for v in spans))
                        self._get_bytes.inc(sum(req.lengths))
                        continue
                    else:
                        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"unknown UCX request op {req.op}")
                    await ucx_loop.send_msg(ep, Reply(store_id=self.store_id))
                except _Refused as e:
                    await ucx_loop.send_msg(ep, Reply(store_id=self.store_id,
                                                      code=e.code.value[0], error=str(e)))
                    if not authed:
                        return
        except Exception as e:  # the peer closed or died, a link broke: the endpoint ends
            log.debug("ucx_endpoint_closed", reason=f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(Exception):
                ep.abort()

    def _slots(self, put_id: str) -> list[memoryview]:
        """Views of the slots a pending put reserved, in slot order."""
        core = self.core
        with core._lock:  # the pending put's slots, as BeginPut reserved them
            pending = core._pending.get(put_id)
            slots = [] if pending is None else [
                (e.tier, e.slot) for e in pending.entries if e.slot is not None]
        if pending is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND,
                           f"no pending put {put_id!r}: it was committed, aborted or expired")
        return [tier.view(slot) for tier, slot in slots]

    async def _put(self, ep: Any, req: kvstore_pb2.UcxRequest) -> None:
        lengths = list(req.lengths)
        try:
            views = self._slots(req.put_id)
            if [v.nbytes for v in views] != lengths:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"put {req.put_id} reserved {len(views)} slots of "
                               f"{sorted({v.nbytes for v in views})} bytes; the request "
                               f"sends {len(lengths)} payloads of "
                               f"{sorted(set(lengths))} bytes")
        except _Refused:
            await self._drain(ep, lengths)  # the payloads are on their way regardless
            raise
        await asyncio.gather(*(ep.recv(v) for v in views))
        self._put_bytes.inc(sum(lengths))

    @staticmethod
    async def _drain(ep: Any, lengths: list[int]) -> None:
        scratch = bytearray(max(lengths, default=0))
        view = memoryview(scratch)
        for n in lengths:
            await ep.recv(view[:n])

    def _spans(self, req: kvstore_pb2.UcxRequest) -> list[memoryview]:
        size = self.tier.arena_bytes
        if len(req.offsets) != len(req.lengths):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{len(req.offsets)} offsets but {len(req.lengths)} lengths")
        for o, n in zip(req.offsets, req.lengths, strict=True):
            if n == 0 or o + n > size:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"span {o}+{n} lies outside the {size}-byte arena")
        return [self.tier.view(Slot(o, n)) for o, n in zip(req.offsets, req.lengths,
                                                             strict=True)]


def start_ucx_listener(settings: ClusterSettings, core: KVStoreCore, tier: CpuTier,
                       store_id: str) -> UcxListener | None:
    """The store's UCX listener, or None when UCX is off or ucxx is not installed."""
    ts = settings.transfer
    if not ts.ucx:
        return None
    reason = ucx_loop.unavailable()
    if reason:
        log.info("ucx_listener_off", reason=reason)
        return None
    try:
        listener = UcxListener(core, tier, store_id, cluster_secret(settings)).start(ts.ucx_port)
    except Exception as e:  # noqa: BLE001 (UCX is an extra rung: the store serves without it)
        log.warning("ucx_listener_failed", error=repr(e))
        return None
    log.info("ucx_listening", port=listener.port, store_id=store_id)
    return listener
