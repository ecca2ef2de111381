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

from services.transfer.contract.errors import InvalidRequestError
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


def as_view(obj: Buffer, *, writable: bool = False) -> memoryview:
    """A flat byte view of ``obj`` with no copy."""
    if not isinstance(obj, bytes | bytearray | memoryview) and hasattr(obj, "__dlpack__") \
            and type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu" and writable:
            raise InvalidRequestError(
                f"a {obj.device.type} tensor cannot receive blocks over this transport; "
                "pass host buffers (or none)")
        # a device payload on a host transport (cuda_ipc fell back): staged here
        obj = obj.detach().contiguous().view(-1).cpu().numpy()
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
