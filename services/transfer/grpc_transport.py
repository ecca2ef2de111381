"""The ``grpc`` transport: payloads ride PutBlocks / GetBlocks streams, any hosts."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import grpc

from services.transfer.base import (
    Buffer,
    KVTransport,
    PutResult,
    bounded,
    check_payloads,
    output_views,
)
from services.transfer.bulk import empty
from services.transfer.contract import wire
from services.transfer.contract.errors import (
    ChecksumError,
    InvalidRequestError,
    wrap_rpc_error,
)
from services.transfer.memory import tune_malloc
from services.transfer.metrics import TransferMeter
from splitserve.v1 import common_pb2, kvstore_pb2

PUT_BLOCKS = "/splitserve.v1.KVStore/PutBlocks"
GET_BLOCKS = "/splitserve.v1.KVStore/GetBlocks"
MAX_CHUNK_BYTES = 32 << 20


class GrpcTransport(KVTransport):
    name = "grpc"

    def __init__(self, channel: grpc.Channel, chunk_bytes: int = 4 << 20,
                 timeout_s: float | None = 120.0) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        # the servers' message limit is 64 MiB; past 32 MiB malloc maps fresh pages
        self.chunk_bytes = min(chunk_bytes, MAX_CHUNK_BYTES)
        tune_malloc()
        self.timeout_s = timeout_s
        self._put_blocks = channel.stream_unary(
            PUT_BLOCKS, request_serializer=wire.identity,
            response_deserializer=kvstore_pb2.CommitPutResponse.FromString)
        self._get_blocks = channel.unary_stream(
            GET_BLOCKS, request_serializer=kvstore_pb2.GetRequest.SerializeToString,
            response_deserializer=wire.decode_block_data)
        self._meter = TransferMeter(self.name)

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
            resp = self._put_blocks(self._chunks(header, views), timeout=bounded(self.timeout_s))
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        self._meter.observe("put", time.perf_counter() - t0, block_nbytes * len(views))
        return PutResult(resp.stored, resp.present)

    def get(self, owner: str, keys: Sequence[bytes], out: Sequence[Buffer] | None = None, *,
            longest_prefix: bool = False) -> list[Buffer]:
        n = len(keys)
        outs = output_views(keys, out)
        if n == 0:
            return []
        t0 = time.perf_counter()
        asm = _Assembler(n, outs, prefix=longest_prefix)
        try:
            for c in self._get_blocks(kvstore_pb2.GetRequest(
                    owner=owner, keys=keys, longest_prefix=longest_prefix),
                    timeout=bounded(self.timeout_s)):
                asm.add(c)
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        results = asm.finish()
        self._meter.observe("get", time.perf_counter() - t0, asm.total)
        if out is not None:
            return list(out[: len(results)])
        return results


class _Assembler:
    """Puts the blocks of a GetBlocks stream together. Packed streams (``lengths`` on
    the first message) run back to back across blocks; a block that lies whole inside
    one message is returned as a view of it (no copy) unless ``outs`` are given. A
    prefix stream (``prefix``) carries the blocks its first message's ``lengths`` name
    (none without a message), fewer when a last message's ``num_blocks`` says so."""

    def __init__(self, n: int, outs: list[memoryview] | None, *,
                 prefix: bool = False) -> None:
        self.n, self.outs, self.prefix = n, outs, prefix
        self.results: list[Buffer | None] = [None] * n
        self.views: list[memoryview | None] = [None] * n
        self.lengths: list[int] | None = None
        self.received = [0] * n
        self.total = 0
        self.packed = False
        self.started = False

    def _dst(self, i: int) -> memoryview:
        dst = self.views[i]
        if dst is None:
            length = self.lengths[i]
            if self.outs is not None:
                dst = self.outs[i]
                if dst.nbytes != length:
                    raise InvalidRequestError(
                        f"output buffer {i} has {dst.nbytes} bytes; the block has {length}")
            else:
                dst = empty(length)
            self.views[i] = self.results[i] = dst
        return dst

    def add(self, c: wire.BlockChunk) -> None:
        first, self.started = not self.started, True
        if c.num_blocks and self.prefix:  # a block failed its checksum: the prefix ends
            if first or c.num_blocks > self.n or c.data.nbytes:
                raise ChecksumError(f"store cut a prefix of {self.n} blocks to "
                                    f"{c.num_blocks}")
            self.n = c.num_blocks
            return
        if c.lengths:
            if len(c.lengths) != self.n and not (self.prefix and len(c.lengths) < self.n):
                raise ChecksumError(f"store sent {len(c.lengths)} lengths for {self.n} keys")
            self.n = len(c.lengths)
            self.lengths, self.packed = list(c.lengths), True
        elif first and self.prefix:
            raise ChecksumError("a prefix stream must name its blocks on its first message")
        elif not self.packed:  # one block per message; its length on its first chunk
            if self.lengths is None:
                self.lengths = [0] * self.n
            if c.offset == 0:
                self.lengths[c.index] = c.length
        data, size = c.data, c.data.nbytes
        i, off, pos = c.index, c.offset, 0
        if i >= self.n:
            raise ChecksumError(f"GetBlocks stream names block {i} of {self.n}")
        while pos < size:
            if i >= self.n:
                raise ChecksumError(f"GetBlocks stream runs past the last of {self.n} blocks")
            length = self.lengths[i]
            take = min(length - off, size - pos) if self.packed else size - pos
            if off == 0 and take == length and self.outs is None:
                self.results[i] = data[pos : pos + take]  # whole: keep the view
            else:
                dst = self._dst(i)
                if off + take > dst.nbytes:
                    raise ChecksumError(f"GetBlocks stream overruns block {i}")
                dst[off : off + take] = data[pos : pos + take]
            self.received[i] += take
            pos += take
            off += take
            if off == length:
                i, off = i + 1, 0
        self.total += size

    def finish(self) -> list[Buffer]:
        if self.prefix and not self.started:  # no message: an empty prefix
            self.n = 0
        lengths = self.lengths or [0] * self.n
        short = [i for i in range(self.n) if self.results[i] is None
                 or self.received[i] != lengths[i]]
        if short:
            raise ChecksumError(f"GetBlocks stream ended early: blocks {short[:8]} incomplete")
        return self.results[: self.n]
