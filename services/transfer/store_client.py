"""``KVStoreClient``: the one client of the KV store that workers and the gateway use.

Control calls go over gRPC; block bytes go over the data-plane transport chosen for
this (client, store) pair (see :mod:`services.transfer`): ``shm`` on the same host,
``ucx`` where it is installed and reachable, ``grpc`` elsewhere, or what
``TransferSettings.transport`` forces. A transport that fails in the middle of a
request is dropped and the request runs once more on a transport opened anew from a
fresh Describe: under ``auto`` the failed rung sits out ``fallback_cooldown_s`` (for
that store instance; a restarted store is a new one, reconnected at once), so the retry
takes the next rung down. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from services.common.auth import SECRET_METADATA_KEY, secret_metadata_from_env, with_metadata
from services.common.logging import get_logger
from services.common.server import RECONNECT_OPTIONS
from services.common.settings import TransferSettings
from services.transfer import (
    Buffer,
    InvalidRequestError,
    KVTransport,
    PutResult,
    StaleTransportError,
    TransportFailure,
    as_view,
    open_transport,
    wrap_rpc_error,
)
from services.transfer.base import bounded, to_refs
from services.transfer.metrics import TRANSPORT_FALLBACKS
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

log = get_logger("kvstore-client")
T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    *RECONNECT_OPTIONS,
]


class KVStoreClient:
    """A client of one KV store at ``address`` (host:port). ``metadata`` goes with every
    call (``services.common.auth.call_metadata(settings)``: the cluster secret); None
    sends the secret of ``SPLITSERVE_CLUSTER_SECRET`` if it is set."""

    def __init__(self, address: str, transfer: TransferSettings | None = None, *,
                 timeout_s: float = 30.0, transfer_timeout_s: float = 120.0,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.address = address
        self.transfer = transfer or TransferSettings()
        self.timeout_s = timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._raw_channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        if metadata is None:
            metadata = secret_metadata_from_env()
        self._secret = dict(metadata).get(SECRET_METADATA_KEY, "")
        self._failed: dict[tuple[str, str], float] = {}  # (store_id, transport) -> when
        self._channel = with_metadata(self._raw_channel, metadata)
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)
        self._lock = threading.Lock()
        self._describe: kvstore_pb2.DescribeResponse | None = None
        self._transport: KVTransport | None = None

    # -- the store --------------------------------------------------------------------
    def describe(self, refresh: bool = False) -> kvstore_pb2.DescribeResponse:
        with self._lock:
            if self._describe is None or refresh:
                self._describe = self._call(self._stub.Describe, kvstore_pb2.DescribeRequest())
            return self._describe

    @property
    def transport(self) -> KVTransport:
        """The data-plane transport to this store (chosen on first use)."""
        if self._transport is None:
            describe = self.describe()
            with self._lock:
                if self._transport is None:
                    self._transport = open_transport(
                        self._channel, describe, self.transfer,
                        timeout_s=self.transfer_timeout_s, host=self.host, secret=self._secret,
                        skip=self._cooling(describe.store_id))
        return self._transport

    @property
    def host(self) -> str:
        """The store's host as this client addresses it."""
        host = self.address.rsplit(":", 1)[0] if ":" in self.address else self.address
        return host.strip("[]")

    def _cooling(self, store_id: str) -> list[str]:
        """The transports that failed with this store instance lately."""
        now, cooldown = time.monotonic(), self.transfer.fallback_cooldown_s
        return [name for (sid, name), at in self._failed.items()
                if sid == store_id and now - at < cooldown]

    @property
    def transport_name(self) -> str:
        return self.transport.name

    def stats(self) -> kvstore_pb2.StatsResponse:
        return self._call(self._stub.Stats, kvstore_pb2.StatsRequest())

    # -- blocks -----------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the store holds (in any tier)."""
        return self._lookup(keys).num_blocks

    def lookup_per_tier(self, keys: Sequence[bytes]) -> dict[str, int]:
        """The longest held prefix of ``keys`` in each tier."""
        return {t.tier: t.num_blocks for t in self._lookup(keys).per_tier}

    def _lookup(self, keys: Sequence[bytes]) -> kvstore_pb2.LookupResponse:
        return self._call(self._stub.Lookup, kvstore_pb2.LookupRequest(keys=list(keys)))

    def prefetch(self, keys: Sequence[bytes]) -> kvstore_pb2.PrefetchResponse:
        """Raises the held blocks of ``keys`` into the store's fastest tier now (before
        a request that will read them is scheduled) -> promoted/resident/missing/failed."""
        return self._call(self._stub.Prefetch, kvstore_pb2.PrefetchRequest(keys=list(keys)))

    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef | bytes],
            payloads: Sequence[Buffer], block_nbytes: int | None = None) -> PutResult:
        """Stores blocks -> (stored, present). ``refs``: BlockRefs (or bare keys for full
        blocks), ``payloads``: one buffer of ``block_nbytes`` bytes per ref (inferred from
        the first payload when None). With an ``owner`` (the request id) the blocks stay
        pinned until ``release(owner)`` or the store's pin TTL; keys already held are
        reported ``present`` and not rewritten. Raises StoreFullError when there is no
        room even after evicting every unpinned block."""
        if block_nbytes is None:
            block_nbytes = as_view(payloads[0]).nbytes if payloads else 1
        refs = to_refs(refs)
        return self._on_transport(lambda t: t.put(owner, refs, payloads, block_nbytes))

    def get(self, owner: str, keys: Sequence[bytes],
            out: Sequence[Buffer] | None = None) -> list[Buffer]:
        """The bytes of every block of ``keys``, in order, pinned for ``owner`` until
        ``release(owner)``. Returns bytes-like objects (bytes, bytearray or
        memoryview), or ``out`` filled in place when given (writable buffers, one per key
        of the block's size: the bytes are copied once, straight into them). Raises
        MissingBlocksError (a KeyError and a grpc.RpcError with NOT_FOUND) when any block
        is missing; then nothing is pinned."""
        keys = list(keys)
        return self._on_transport(lambda t: t.get(owner, keys, out))

    def get_prefix(self, owner: str, keys: Sequence[bytes],
                   out: Sequence[Buffer] | None = None) -> list[Buffer]:
        """The blocks of the longest prefix of ``keys`` the store holds, in one round trip:
        as many buffers as blocks held (possibly none), each pinned for ``owner`` until
        ``release(owner)``; nothing past the prefix is pinned. A block that fails its
        checksum is a miss: the prefix ends before it. ``out`` as in ``get`` (its first
        buffers are filled). With no keys, no call at all."""
        keys = list(keys)
        if not keys:
            return []
        return self._on_transport(lambda t: t.get(owner, keys, out, longest_prefix=True))

    def _on_transport(self, op: Callable[[KVTransport], T]) -> T:
        """Runs ``op(transport)``; when the store restarted under the transport, or the
        transport failed mid-request, drops it and runs ``op`` once more on a transport
        opened from a fresh Describe (the next rung down, under ``auto``)."""
        transport = self.transport
        try:
            return op(transport)
        except StaleTransportError:
            self._drop(transport)
        except TransportFailure as e:
            store_id = getattr(transport, "store_id", "")
            with self._lock:
                self._failed[(store_id, transport.name)] = time.monotonic()
            self._drop(transport)
            log.warning("transport_failed", store=store_id, transport=transport.name,
                        error=e.details(), retry="once, on a transport opened anew")
            retry = self.transport
            TRANSPORT_FALLBACKS.labels(transport.name, retry.name).inc()
            return op(retry)
        return op(self.transport)

    def _drop(self, transport: KVTransport) -> None:
        with self._lock:
            if self._transport is transport:
                self._transport, self._describe = None, None
        transport.close()

    def pin(self, owner: str, keys: Sequence[bytes], ttl_s: float = 0.0) -> int:
        """Pins the longest held prefix of ``keys`` for ``owner`` without reading them
        (until ``release(owner)``, or ``ttl_s``; 0: the store's pin TTL) -> blocks pinned."""
        if not owner:
            raise InvalidRequestError("pin needs an owner")
        if not keys:
            return 0
        return self._call(self._stub.Pin, kvstore_pb2.PinRequest(
            owner=owner, keys=list(keys), ttl_s=ttl_s)).num_blocks

    def release(self, owner: str) -> int:
        """Drops every pin of ``owner`` and its private blocks -> pins dropped."""
        if not owner:
            raise InvalidRequestError("release needs an owner")
        return self._call(self._stub.Release, kvstore_pb2.ReleaseRequest(owner=owner)).released

    def release_quietly(self, owner: str) -> bool:
        """``release`` for cleanup paths: a store that cannot be reached is logged, not
        raised (the owner's pins expire after the store's pin TTL anyway)."""
        try:
            self.release(owner)
            return True
        except grpc.RpcError as e:
            log.warning("release_failed", owner=owner, code=e.code().name, error=e.details())
            return False

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._raw_channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=bounded(self.timeout_s))
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
