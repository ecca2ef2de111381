"""The errors a client of the KV store sees: each a ``grpc.RpcError`` with the status
the store answered (``wrap_rpc_error`` maps a failed call to its type), so callers
catch either the type or the status."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


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
