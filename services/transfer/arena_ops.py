"""What the transports that move bytes beside gRPC (``shm``, ``ucx``) share: reading the
store's packed BeginPut / Get answers, pinning a get and letting go of it, aborting a
begun put, and re-reading over GetBlocks, where the store verifies each block itself,
the blocks whose crc32 failed on arrival."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import grpc

from services.transfer.base import Buffer, bounded
from services.transfer.contract.errors import InvalidRequestError, wrap_rpc_error
from services.transfer.grpc_transport import GrpcTransport
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc


def put_offsets(begun: kvstore_pb2.BeginPutResponse, block_nbytes: int) -> list[int]:
    """Where to write each block (-1: already held), from a packed answer or slots."""
    if begun.offsets or not begun.slots:
        return list(begun.offsets)
    for s in begun.slots:
        if not s.present and s.length != block_nbytes:
            raise InvalidRequestError(f"store reserved {s.length} bytes for a "
                                      f"{block_nbytes}-byte block")
    return [-1 if s.present else s.offset for s in begun.slots]


def two_phase_put(
    stub: kvstore_pb2_grpc.KVStoreStub, owner: str, refs: Sequence[common_pb2.BlockRef],
    block_nbytes: int, timeout_s: float | None, store_id: str,
    stale: Callable[[str], Exception],
    write: Callable[[kvstore_pb2.BeginPutResponse, list[int]], list[int]], *,
    device: bool = False, landed: Callable[[], object] | None = None,
) -> tuple[kvstore_pb2.CommitPutResponse, list[int]]:
    """BeginPut -> ``write(its answer, offsets)`` (where each block goes, -1 for one
    already held; it returns the checksums CommitPut takes) -> CommitPut ->
    (its answer, the offsets). Any failure after BeginPut aborts the put; ``stale(id)``
    is raised when another store instance answers. ``device``: the slots are in the gpu
    tier (unless the answer says ``spilled``: then in the host arena). ``landed``: the
    writer writes a landing token where the answer gives a pad, and this waits for its
    copies (before a failed commit's abort; see :func:`commit_put`)."""
    begun, offsets = begin_put(stub, owner, refs, block_nbytes, timeout_s, store_id, stale,
                               device=device, landing=landed is not None)
    try:
        sums = write(begun, offsets)
    except BaseException:
        abort_put(stub, begun.put_id)
        raise
    return commit_put(stub, begun, sums, timeout_s, landed), offsets


def begin_put(
    stub: kvstore_pb2_grpc.KVStoreStub, owner: str, refs: Sequence[common_pb2.BlockRef],
    block_nbytes: int, timeout_s: float | None, store_id: str,
    stale: Callable[[str], Exception], *, device: bool = False, landing: bool = False,
) -> tuple[kvstore_pb2.BeginPutResponse, list[int]]:
    """The first half of :func:`two_phase_put` -> (BeginPut's answer, the offsets).
    ``landing``: the writer writes a landing token where the answer gives a pad
    (``landing_offset``), after its copies (kvstore.landing)."""
    try:
        begun = stub.BeginPut(kvstore_pb2.BeginPutRequest(
            owner=owner, blocks=refs, block_nbytes=block_nbytes, packed=True,
            device=device, landing=landing), timeout=bounded(timeout_s))
    except grpc.RpcError as e:
        raise wrap_rpc_error(e) from None
    try:
        if begun.store_id and begun.store_id != store_id:
            raise stale(begun.store_id)
        offsets = put_offsets(begun, block_nbytes)
        if len(offsets) != len(refs):
            raise InvalidRequestError(f"store answered {len(offsets)} slots for "
                                      f"{len(refs)} blocks")
    except BaseException:
        abort_put(stub, begun.put_id)
        raise
    return begun, offsets


def commit_put(stub: kvstore_pb2_grpc.KVStoreStub, begun: kvstore_pb2.BeginPutResponse,
               sums: list[int], timeout_s: float | None,
               landed: Callable[[], object] | None = None) -> kvstore_pb2.CommitPutResponse:
    """The second half of :func:`two_phase_put`: a put whose commit fails is aborted.
    A put with a landing pad commits before its copies land (the store waits for the
    token); then ``landed`` waits for the copies before a failure's abort frees their
    slots."""
    landing = begun.landing_offset != 0
    try:
        return stub.CommitPut(kvstore_pb2.CommitPutRequest(
            put_id=begun.put_id, checksums=sums, landing=landing),
            timeout=bounded(timeout_s))
    except BaseException as e:
        if landing and landed is not None:
            landed()
        abort_put(stub, begun.put_id)
        if isinstance(e, grpc.RpcError):
            raise wrap_rpc_error(e) from None
        raise


def locations(resp: kvstore_pb2.GetResponse) -> tuple[list[int], list[int], list[int]]:
    """(offsets, lengths, checksums) of a Get answer, packed or in ``blocks``."""
    if resp.offsets or not resp.blocks:
        offsets, lengths = list(resp.offsets), list(resp.lengths)
        checksums = list(resp.checksums)
        if not len(offsets) == len(lengths) == len(checksums):
            raise InvalidRequestError("store answered a malformed Get")
        return offsets, lengths, checksums
    blocks = resp.blocks
    return ([b.offset for b in blocks], [b.length for b in blocks],
            [b.checksum for b in blocks])


def abort_put(stub: kvstore_pb2_grpc.KVStoreStub, put_id: str) -> None:
    """Frees a begun put's slots now (else they wait for the store's pin TTL); quiet."""
    with contextlib.suppress(grpc.RpcError):
        stub.CommitPut(kvstore_pb2.CommitPutRequest(put_id=put_id, abort=True), timeout=5.0)


def pinned_locations(
    stub: kvstore_pb2_grpc.KVStoreStub, owner: str, keys: Sequence[bytes],
    longest_prefix: bool, timeout_s: float | None, store_id: str,
    stale: Callable[[str], Exception], *, device: bool = False,
) -> tuple[list[int], list[int], list[int]]:
    """Pins ``keys`` (or their longest held prefix) for ``owner`` with a packed Get and
    says where they lie in the arena: (offsets, lengths, checksums). Raises
    ``stale(id)`` when another store instance answers. ``device``: see
    :func:`pinned_device_locations`."""
    return pinned_device_locations(stub, owner, keys, longest_prefix, timeout_s, store_id,
                                   stale, device=device)[:3]


def pinned_device_locations(
    stub: kvstore_pb2_grpc.KVStoreStub, owner: str, keys: Sequence[bytes],
    longest_prefix: bool, timeout_s: float | None, store_id: str,
    stale: Callable[[str], Exception], *, device: bool = True,
) -> tuple[list[int], list[int], list[int], list[bool], list[bool]]:
    """``pinned_locations`` for a reader that maps the gpu arena too (``device``):
    blocks in the gpu tier stay there; the fourth list says which offsets are in it, the
    fifth which checksums are dsum32 (the others: crc32)."""
    resp = stub.Get(kvstore_pb2.GetRequest(owner=owner, keys=keys, device=device,
                                           longest_prefix=longest_prefix, packed=True),
                    timeout=timeout_s)
    if resp.store_id and resp.store_id != store_id:
        raise stale(resp.store_id)
    offsets, lengths, checksums = locations(resp)
    n, m = len(keys), len(offsets)
    if m > n or (m < n and not longest_prefix):
        raise InvalidRequestError(f"store answered {m} blocks for {n} keys")
    on_device = list(resp.on_device) or [False] * m
    device_sums = list(resp.device_sums) or on_device
    if len(on_device) != m or len(device_sums) != m:
        raise InvalidRequestError("store answered a malformed Get (on_device)")
    return offsets, lengths, checksums, on_device, device_sums


def release_anonymous(stub: kvstore_pb2_grpc.KVStoreStub, owner: str, pin_owner: str) -> None:
    """Drops the pins a get with no owner took under its own name (else they expire)."""
    if not owner:
        with contextlib.suppress(grpc.RpcError):
            stub.Release(kvstore_pb2.ReleaseRequest(owner=pin_owner), timeout=5.0)


def reread_bad(channel: grpc.Channel, owner: str, keys: Sequence[bytes], held: int,
               bad: list[int], results: list[Buffer], outs: list[memoryview] | None,
               longest_prefix: bool, timeout_s: float | None) -> list[Buffer]:
    """The results once the blocks whose crc32 failed on arrival are read again."""
    if bad and longest_prefix:
        return refetch_prefix(channel, owner, keys, held, bad[0], results, outs, timeout_s)
    if bad:
        refetch(channel, owner, keys, bad, results, outs)
    return results


def refetch(channel: grpc.Channel, owner: str, keys: Sequence[bytes], bad: list[int],
            results: list[Buffer], outs: list[memoryview] | None) -> None:
    """Blocks whose copy failed its crc32 go through GetBlocks, where the store
    verifies them itself: a corrupt block is dropped there and reported missing."""
    again = GrpcTransport(channel).get(owner, [keys[i] for i in bad])
    for i, data in zip(bad, again, strict=True):
        if outs is not None:
            outs[i][:] = data
        else:
            results[i] = data


def refetch_prefix(channel: grpc.Channel, owner: str, keys: Sequence[bytes], held: int,
                   first_bad: int, results: list[Buffer], outs: list[memoryview] | None,
                   timeout_s: float | None) -> list[Buffer]:
    """A block of a prefix failed its crc32 here: the store verifies the rest of the
    prefix itself (GetBlocks drops a corrupt block, which ends the prefix), and the
    pins this call took past the prefix are dropped."""
    rest = keys[first_bad:held]
    again = GrpcTransport(channel).get(owner, rest, longest_prefix=True)
    for i, data in enumerate(again, first_bad):
        if outs is not None:
            outs[i][:] = data
        else:
            results[i] = data
    end = first_bad + len(again)
    if end < held:
        kvstore_pb2_grpc.KVStoreStub(channel).Release(
            kvstore_pb2.ReleaseRequest(owner=owner, keys=keys[end:held]), timeout=timeout_s)
    return results[:end]
