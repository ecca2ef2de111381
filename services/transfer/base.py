"""The data-plane interface: one ``KVTransport`` per (client, store) pair, several kinds.

A transport moves the bytes of KV blocks in and out of one store; the control messages
(which blocks, which owner) are the store's gRPC API either way. Payloads are anything
with the buffer protocol (bytes, bytearray, memoryview, numpy arrays) or a CPU torch
tensor; every one is one contiguous block of exactly ``block_nbytes`` bytes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import grpc

from splitserve.v1 import common_pb2

_CALL_DEADLINE: ContextVar[float | None] = ContextVar("kv_store_call_deadline", default=None)


@contextmanager
def call_deadline(seconds: float | None) -> Iterator[None]:
    """Store calls made inside this block (on this thread) end within ``seconds``: their
    gRPC timeouts are cut to the time left (a request's deadline reaches the store)."""
    if seconds is None:
        yield
        return
    token = _CALL_DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _CALL_DEADLINE.reset(token)


def bounded(timeout_s: float | None) -> float | None:
    """``timeout_s`` cut to the time left under :func:`call_deadline`, if any."""
    end = _CALL_DEADLINE.get()
    if end is None:
        return timeout_s
    left = max(0.001, end - time.monotonic())
    return left if timeout_s is None else min(timeout_s, left)

Buffer = Any  # bytes | bytearray | memoryview | numpy array | CPU torch tensor


class PutResult(NamedTuple):
    stored: int  # blocks newly stored
    present: int  # blocks the store already held


class KVStoreError(grpc.RpcError):
    """A store call that failed; ``code()``/``details()`` like a grpc.Call, so code that
    catches ``grpc.RpcError`` catches it too."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class MissingBlocksError(KVStoreError, KeyError):
    """Some requested blocks are not in the store (NOT_FOUND)."""

    def __init__(self, details: str, keys: Sequence[bytes] = ()) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, details)
        self.keys = list(keys)

    __str__ = KVStoreError.__str__


class StoreFullError(KVStoreError):
    """The store cannot make room for a put (RESOURCE_EXHAUSTED): nothing was stored."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


class InvalidRequestError(KVStoreError, ValueError):
    """A malformed request (INVALID_ARGUMENT); the message says what to fix."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details)

    __str__ = KVStoreError.__str__


class ChecksumError(KVStoreError):
    """A block's bytes do not match its crc32 (DATA_LOSS)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, details)


class StaleTransportError(KVStoreError):
    """The store behind a transport is not the one it was opened for (it restarted):
    reopen the transport (KVStoreClient does, and retries once)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)


class TransportFailure(KVStoreError):
    """A transport's own link broke in the middle of a request (a peer gone, a link
    down, a timeout on the data path): KVStoreClient retries the request once on the
    next transport down the ladder."""

    def __init__(self, transport: str, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"{transport}: {details}")
        self.transport = transport


def wrap_rpc_error(e: grpc.RpcError) -> KVStoreError:
    """A typed error for a failed call (already-typed errors pass through)."""
    if isinstance(e, KVStoreError):
        return e
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    if code == grpc.StatusCode.NOT_FOUND:
        return MissingBlocksError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return StoreFullError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    if code == grpc.StatusCode.DATA_LOSS:
        return ChecksumError(details)
    return KVStoreError(code, details)


def as_view(obj: Buffer, *, writable: bool = False) -> memoryview:
    """A flat byte view of ``obj`` with no copy."""
    if not isinstance(obj, bytes | bytearray | memoryview) and hasattr(obj, "__dlpack__") \
            and type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu":
            raise InvalidRequestError(
                f"a {obj.device.type} tensor cannot go through this transport; copy it to "
                "host memory first")
        obj = obj.detach().contiguous().view(-1).numpy()
    mv = obj if isinstance(obj, memoryview) else memoryview(obj)
    if writable and mv.readonly:
        raise InvalidRequestError("an output buffer must be writable (bytearray, numpy, ...)")
    if mv.ndim != 1 or mv.format != "B":
        if not mv.c_contiguous:
            raise InvalidRequestError("a payload must be one contiguous buffer")
        mv = mv.cast("B")
    return mv


def to_refs(refs: Sequence[common_pb2.BlockRef | bytes]) -> list[common_pb2.BlockRef]:
    """BlockRefs from refs or bare keys (a bare key is a full, shared block)."""
    ref = common_pb2.BlockRef
    return [ref(key=r) if type(r) is bytes else r if isinstance(r, ref) else ref(key=bytes(r))
            for r in refs]


def check_payloads(refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
                   block_nbytes: int) -> list[memoryview]:
    if len(payloads) != len(refs):
        raise InvalidRequestError(f"{len(refs)} block refs but {len(payloads)} payloads")
    if block_nbytes <= 0:
        raise InvalidRequestError(f"block_nbytes must be > 0, got {block_nbytes}")
    views = [as_view(p) for p in payloads]
    for i, v in enumerate(views):
        if v.nbytes != block_nbytes:
            raise InvalidRequestError(
                f"payload {i} has {v.nbytes} bytes; every block is block_nbytes="
                f"{block_nbytes} bytes")
    return views


def output_views(keys: Sequence[bytes], out: Sequence[Buffer] | None) -> list[memoryview] | None:
    """Writable views of a get's ``out`` buffers (one per key), or None without ``out``."""
    if out is None:
        return None
    if len(out) != len(keys):
        raise InvalidRequestError(f"{len(keys)} keys but {len(out)} output buffers")
    return [as_view(o, writable=True) for o in out]


class KVTransport(ABC):
    """Moves block bytes between this process and one store."""

    name: str

    @abstractmethod
    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
            block_nbytes: int) -> PutResult:
        """Stores the blocks (pinned for ``owner`` when it is not empty) -> (stored, present).
        A key the store already holds is not rewritten."""

    @abstractmethod
    def get(self, owner: str, keys: Sequence[bytes], out: Sequence[Buffer] | None = None, *,
            longest_prefix: bool = False) -> list[Buffer]:
        """The bytes of every block, pinned for ``owner`` until it is released (an empty
        owner pins only for the duration of the call). With ``out``, the bytes land in
        those writable buffers (one per key, each exactly the block's size), which are
        returned; else fresh buffers are. Raises MissingBlocksError if any is missing.
        With ``longest_prefix``: the blocks of the longest prefix of ``keys`` the store
        holds (possibly none; a block failing its checksum ends it), only those pinned,
        and no error for a missing key; with ``out``, its first buffers are filled."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass
