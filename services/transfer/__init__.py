"""The KV data plane: one interface (``KVTransport``), a transport per kind of link.

``open_transport`` walks a ladder per (client, store) pair, fastest first: ``cuda_ipc``
(the store's gpu tier mapped through CUDA IPC: same host, torch with CUDA), ``shm``
(the store's arena in shared memory on this host), ``ucx`` (ucxx installed and the
store's UCX listener reachable), ``grpc`` (always).
``TransferSettings.transport`` forces one. The choice is logged and counted
(``splitserve_kv_transport_choices_total{transport}``); KVStoreClient steps down a
rung when a transport fails in the middle of a request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from services.common.logging import get_logger
from services.common.settings import TransferSettings
from services.transfer.base import (
    Buffer,
    KVTransport,
    PutResult,
    as_view,
)
from services.transfer.contract.errors import (
    ChecksumError,
    InvalidRequestError,
    KVStoreError,
    MissingBlocksError,
    StaleTransportError,
    StoreFullError,
    TransportFailure,
    wrap_rpc_error,
)
from services.transfer.grpc_transport import GrpcTransport
from services.transfer.metrics import TRANSPORT_CHOICES
from services.transfer.shm_transport import ShmTransport, ShmUnavailable
from services.transfer.ucx_transport import UcxTransport, UcxUnavailable, ucx_peer_host
from splitserve.v1 import kvstore_pb2

LADDER = ("cuda_ipc", "shm", "ucx", "grpc")  # fastest first
TRANSPORTS = ("auto", "cuda_ipc", "grpc", "shm", "ucx")

__all__ = [
    "LADDER", "TRANSPORTS", "Buffer", "ChecksumError", "GrpcTransport", "InvalidRequestError",
    "KVStoreError", "KVTransport", "MissingBlocksError", "PutResult", "ShmTransport",
    "ShmUnavailable", "StaleTransportError", "StoreFullError", "TransportFailure",
    "TransportUnavailable", "UcxTransport", "UcxUnavailable", "as_view", "open_transport",
    "wrap_rpc_error",
]

log = get_logger("transfer")


class TransportUnavailable(OSError):
    """A transport that cannot be opened to this store from here."""


class _Peer:
    """What an opener needs to know of one (client, store) pair."""

    def __init__(self, channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                 settings: TransferSettings, timeout_s: float | None, host: str,
                 secret: str) -> None:
        self.channel, self.describe, self.settings = channel, describe, settings
        self.timeout_s, self.host, self.secret = timeout_s, host, secret


def _cuda_ipc(p: _Peer) -> KVTransport:
    if not p.describe.HasField("gpu") or not p.describe.gpu.handle:
        raise TransportUnavailable("the store has no gpu tier")
    try:  # torch: only a process that has it (a worker) can take this rung
        from services.transfer.cuda_ipc_transport import CudaIpcTransport, CudaIpcUnavailable
    except ImportError as e:
        raise TransportUnavailable(f"cuda_ipc needs torch: {e}") from e
    try:
        return CudaIpcTransport(p.channel, p.describe, timeout_s=p.timeout_s)
    except CudaIpcUnavailable as e:
        raise TransportUnavailable(str(e)) from e


def _shm(p: _Peer) -> KVTransport:
    if not p.describe.shm_name and p.settings.transport != "shm":
        raise ShmUnavailable("the store exposes no shared-memory arena")
    return ShmTransport(p.channel, p.describe, timeout_s=p.timeout_s)


def _ucx(p: _Peer) -> KVTransport:
    return UcxTransport(p.channel, p.describe, ucx_peer_host(p.describe, p.host),
                        timeout_s=p.timeout_s,
                        connect_timeout_s=p.settings.ucx_connect_timeout_s, secret=p.secret)


def _grpc(p: _Peer) -> KVTransport:
    return GrpcTransport(p.channel, p.settings.chunk_bytes, timeout_s=p.timeout_s)


OPENERS: dict[str, Callable[[_Peer], KVTransport]] = {
    "cuda_ipc": _cuda_ipc, "shm": _shm, "ucx": _ucx, "grpc": _grpc}
UNAVAILABLE = (TransportUnavailable, ShmUnavailable, UcxUnavailable)


def rungs(kind: str, below: str | None = None, skip: Sequence[str] = ()) -> list[str]:
    """The transports to try, in order: the ladder under ``below`` (or all of it) less
    ``skip`` for ``auto`` or a fallback; else the one forced."""
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
    if below is not None:
        return [t for t in LADDER[LADDER.index(below) + 1:] if t not in skip]
    if kind != "auto":
        return [kind]
    return [t for t in LADDER if t not in skip or t == "grpc"]


def open_transport(channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                   settings: TransferSettings | None = None,
                   timeout_s: float | None = 120.0, *, host: str = "127.0.0.1",
                   secret: str = "", below: str | None = None,
                   skip: Sequence[str] = ()) -> KVTransport:
    """The transport to use with the store ``describe`` came from, over ``channel``
    (``host``: where this client reaches the store's gRPC port). ``below``: only rungs
    under that transport (a fallback); ``skip``: rungs to pass over (they failed)."""
    settings = settings or TransferSettings()
    peer = _Peer(channel, describe, settings, timeout_s, host, secret)
    tried: list[str] = []
    for name in rungs(settings.transport, below, skip):
        try:
            transport = OPENERS[name](peer)
        except UNAVAILABLE as e:
            if settings.transport == name and below is None:
                raise type(e)(f"transport {name!r} forced but unavailable: {e}") from e
            tried.append(f"{name}: {e}")
            continue
        log.info("transport_chosen", store=describe.store_id, transport=name,
                 fallback_from=below or "", passed_over=tried)
        TRANSPORT_CHOICES.labels(name).inc()
        return transport
    raise TransportUnavailable(f"no transport to store {describe.store_id} below "
                               f"{below or settings.transport}: {'; '.join(tried)}")
