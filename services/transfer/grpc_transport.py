"""The ``grpc`` transport: payloads ride PutBlocks / GetBlocks streams, any hosts."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import grpc

from services.transfer import wire
from services.transfer.base import (
    Buffer,
    ChecksumError,
    InvalidRequestError,
    KVTransport,
    PutResult,
    as_view,
    check_payloads,
    wrap_rpc_error,
)
from services.transfer.memory import tune_malloc
from services.transfer.metrics import TRANSFER_BYTES, TRANSFER_SECONDS
from splitserve.v1 import common_pb2, kvstore_pb2

PUT_BLOCKS = "/splitserve.v1.KVStore/PutBlocks"
GET_BLOCKS = "/splitserve.v1.KVStore/GetBlocks"


class GrpcTransport(KVTransport):
    name = "grpc"

    def __init__(self, channel: grpc.Channel, chunk_bytes: int = 4 << 20,
                 timeout_s: float | None = 120.0) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        tune_malloc()
        self.timeout_s = timeout_s
        self._put_blocks = channel.stream_unary(
            PUT_BLOCKS, request_serializer=wire.identity,
            response_deserializer=kvstore_pb2.CommitPutResponse.FromString)
        self._get_blocks = channel.unary_stream(
            GET_BLOCKS, request_serializer=kvstore_pb2.GetRequest.SerializeToString,
            response_deserializer=wire.decode_block_data)
        self._put_bytes = TRANSFER_BYTES.labels(self.name, "put")
        self._get_bytes = TRANSFER_BYTES.labels(self.name, "get")
        self._put_time = TRANSFER_SECONDS.labels(self.name, "put")
        self._get_time = TRANSFER_SECONDS.labels(self.name, "get")

    def _chunks(self, header: bytes, views: Sequence[memoryview]) -> Iterator[bytes]:
        """PutChunk messages of ``chunk_bytes`` payload bytes, blocks back to back."""
        chunk = self.chunk_bytes
        pieces: list[memoryview] = []
        size = 0
        for v in views:
            pos, n = 0, v.nbytes
            while pos < n:
                take = min(chunk - size, n - pos)
                pieces.append(v[pos : pos + take])
                size += take
                pos += take
                if size == chunk:
                    yield wire.encode_put_chunk(header, pieces, size)
                    header, pieces, size = b"", [], 0
        if pieces or header:
            yield wire.encode_put_chunk(header, pieces, size)

    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
            block_nbytes: int) -> PutResult:
        views = check_payloads(refs, payloads, block_nbytes)
        if not refs:
            return PutResult(0, 0)
        header = kvstore_pb2.PutChunk(owner=owner, blocks=refs,
                                      block_nbytes=block_nbytes).SerializeToString()
        t0 = time.perf_counter()
        try:
            resp = self._put_blocks(self._chunks(header, views), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        self._put_time.observe(time.perf_counter() - t0)
        self._put_bytes.inc(block_nbytes * len(views))
        return PutResult(resp.stored, resp.present)

    def get(self, owner: str, keys: Sequence[bytes],
            out: Sequence[Buffer] | None = None) -> list[Buffer]:
        n = len(keys)
        if out is not None and len(out) != n:
            raise InvalidRequestError(f"{n} keys but {len(out)} output buffers")
        if n == 0:
            return []
        outs = [as_view(o, writable=True) for o in out] if out is not None else None
        results: list[Buffer | None] = [None] * n
        views: list[memoryview | None] = [None] * n
        lengths = [0] * n
        received = [0] * n
        total = 0
        t0 = time.perf_counter()
        try:
            for c in self._get_blocks(kvstore_pb2.GetRequest(owner=owner, keys=keys),
                                      timeout=self.timeout_s):
                i, size = c.index, c.data.nbytes
                if c.offset == 0:
                    lengths[i] = c.length
                    if outs is None and size == c.length:  # the whole block: no copy
                        results[i] = c.data
                        received[i] = size
                        total += size
                        continue
                    dst = outs[i] if outs is not None else memoryview(bytearray(c.length))
                    if dst.nbytes != c.length:
                        raise InvalidRequestError(
                            f"output buffer {i} has {dst.nbytes} bytes; the block has "
                            f"{c.length}")
                    views[i] = dst
                    results[i] = out[i] if out is not None else dst.obj
                dst = views[i]
                if dst is None or c.offset + size > dst.nbytes:
                    raise ChecksumError(f"GetBlocks stream out of order at block {i}")
                dst[c.offset : c.offset + size] = c.data
                received[i] += size
                total += size
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        short = [i for i in range(n) if results[i] is None or received[i] != lengths[i]]
        if short:
            raise ChecksumError(f"GetBlocks stream ended early: blocks {short[:8]} incomplete")
        self._get_time.observe(time.perf_counter() - t0)
        self._get_bytes.inc(total)
        return results  # type: ignore[return-value]
