"""The KV data plane: one interface (``KVTransport``), a transport per kind of link.

``open_transport`` picks one per (client, store) pair: ``shm`` when the store exposes its
arena in shared memory on this host, else ``grpc``; ``TransferSettings.transport``
forces one. (``cuda_ipc`` and ``ucx`` plug in here later.)
"""

from __future__ import annotations

import grpc

from services.common.logging import get_logger
from services.common.settings import TransferSettings
from services.transfer.base import (
    Buffer,
    ChecksumError,
    InvalidRequestError,
    KVStoreError,
    KVTransport,
    MissingBlocksError,
    PutResult,
    StaleTransportError,
    StoreFullError,
    as_view,
    wrap_rpc_error,
)
from services.transfer.grpc_transport import GrpcTransport
from services.transfer.shm_transport import ShmTransport, ShmUnavailable
from splitserve.v1 import kvstore_pb2

TRANSPORTS = ("auto", "grpc", "shm")

__all__ = [
    "TRANSPORTS", "Buffer", "ChecksumError", "GrpcTransport", "InvalidRequestError",
    "KVStoreError", "KVTransport", "MissingBlocksError", "PutResult", "ShmTransport",
    "ShmUnavailable", "StaleTransportError", "StoreFullError", "as_view", "open_transport",
    "wrap_rpc_error",
]


def open_transport(channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                   settings: TransferSettings | None = None,
                   timeout_s: float | None = 120.0) -> KVTransport:
    """The transport to use with the store ``describe`` came from, over ``channel``."""
    settings = settings or TransferSettings()
    kind = settings.transport
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
    if kind in ("auto", "shm") and (describe.shm_name or kind == "shm"):
        try:
            return ShmTransport(channel, describe, timeout_s=timeout_s)
        except ShmUnavailable as e:
            if kind == "shm":
                raise ShmUnavailable(f"transport 'shm' forced but unavailable: {e}") from e
            get_logger("transfer").info("shm_unavailable", store=describe.store_id,
                                        reason=str(e), fallback="grpc")
    return GrpcTransport(channel, settings.chunk_bytes, timeout_s=timeout_s)
