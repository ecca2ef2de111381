"""The arena allocator and the wire codec of the bulk messages."""

from __future__ import annotations

import random

import pytest

from kvstore.tiers.allocator import SpanAllocator
from services.transfer.contract import wire
from splitserve.v1 import common_pb2, kvstore_pb2


def test_allocator_aligns_and_coalesces():
    a = SpanAllocator(1024, alignment=64, base=100)
    x = a.allocate(10)
    y = a.allocate(64)
    z = a.allocate(65)
    assert (x, y, z) == (100, 164, 228)
    assert a.used == 64 + 64 + 128
    assert a.allocate(2000) is None
    a.free(y, 64)
    a.free(x, 10)
    assert a.holes == 2  # [100, 228) and the tail
    a.free(z, 65)
    assert a.holes == 1 and a.used == 0 and a.largest_hole == 1024
    with pytest.raises(ValueError, match="double free"):
        a.free(x, 10)


def test_allocator_random_workload_never_overlaps():
    rng = random.Random(0)
    a = SpanAllocator(1 << 16, alignment=64)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        else:
            n = rng.choice([64, 100, 1000, 4096, 5000])
            off = a.allocate(n)
            if off is not None:
                live[off] = n
        spans = sorted((o, o + a.rounded(n)) for o, n in live.items())
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
        assert a.used == sum(a.rounded(n) for n in live.values())
    for off, n in list(live.items()):
        a.free(off, n)
    assert a.holes == 1 and a.used == 0


def test_put_chunk_codec_matches_protobuf():
    header = kvstore_pb2.PutChunk(
        owner="req-1", block_nbytes=300,
        blocks=[common_pb2.BlockRef(key=b"k" * 16, num_tokens=16)]).SerializeToString()
    raw = wire.encode_put_chunk(header, [memoryview(b"a" * 200), memoryview(b"b" * 100)], 300)
    msg = kvstore_pb2.PutChunk.FromString(raw)
    assert (msg.owner, msg.block_nbytes, msg.data) == ("req-1", 300, b"a" * 200 + b"b" * 100)
    hdr, data = wire.decode_put_chunk(raw)
    assert bytes(data) == msg.data and hdr.owner == "req-1" and not hdr.data
    assert hdr.blocks[0].num_tokens == 16
    # a message a generated client built decodes too
    hdr, data = wire.decode_put_chunk(kvstore_pb2.PutChunk(data=b"xyz").SerializeToString())
    assert bytes(data) == b"xyz" and not hdr.blocks


def test_block_data_codec_matches_protobuf():
    for index, offset, length, data in [(0, 0, 5, b"hello"), (300, 1 << 40, 0, b""),
                                        (7, 129, 1 << 20, b"x" * 1000)]:
        raw = wire.encode_block_data(index, offset, length, memoryview(data))
        m = kvstore_pb2.BlockData.FromString(raw)
        assert (m.index, m.offset, m.length, m.data) == (index, offset, length, data)
        c = wire.decode_block_data(
            kvstore_pb2.BlockData(index=index, offset=offset, length=length,
                                  data=data).SerializeToString())
        assert (c.index, c.offset, c.length, bytes(c.data)) == (index, offset, length, data)


def _chunks(msgs):
    return [wire.decode_block_data(wire.encode_block_data(*m)) for m in msgs]


def test_assembler_reads_packed_and_per_block_streams():
    from services.transfer.grpc_transport import _Assembler

    a, b, c = b"a" * 10, b"b" * 4, b"c" * 7
    packed = _chunks([(0, 0, 10, memoryview(a + b[:2]), [10, 4, 7]),
                      (1, 2, 0, memoryview(b[2:] + c), ())])
    per_block = _chunks([(0, 0, 10, memoryview(a[:6])), (0, 6, 0, memoryview(a[6:])),
                         (1, 0, 4, memoryview(b)), (2, 0, 7, memoryview(c))])
    for stream in (packed, per_block):
        asm = _Assembler(3, None)
        for ch in stream:
            asm.add(ch)
        assert [bytes(x) for x in asm.finish()] == [a, b, c]
        outs = [bytearray(10), bytearray(4), bytearray(7)]
        asm = _Assembler(3, [memoryview(o) for o in outs])
        for ch in stream:
            asm.add(ch)
        asm.finish()
        assert outs == [bytearray(a), bytearray(b), bytearray(c)]
    asm = _Assembler(3, None)
    asm.add(packed[0])
    with pytest.raises(Exception, match="ended early"):
        asm.finish()


def test_block_data_num_blocks_matches_protobuf():
    raw = wire.encode_block_data(0, 0, 0, (), num_blocks=3)
    assert kvstore_pb2.BlockData.FromString(raw).num_blocks == 3
    c = wire.decode_block_data(kvstore_pb2.BlockData(num_blocks=5).SerializeToString())
    assert (c.num_blocks, c.data.nbytes, c.lengths) == (5, 0, [])


def test_assembler_reads_prefix_streams():
    from services.transfer.grpc_transport import _Assembler

    a, b, c = b"a" * 10, b"b" * 4, b"c" * 7

    def run(msgs, n=3, outs=None):
        asm = _Assembler(n, outs, prefix=True)
        for ch in _chunks(msgs):
            asm.add(ch)
        return [bytes(x) for x in asm.finish()]

    assert run([]) == []  # no message: an empty prefix
    assert run([(0, 0, 10, memoryview(a + b), [10, 4])]) == [a, b]  # 2 of 3 held
    assert run([(0, 0, 10, memoryview(a + b + c), [10, 4, 7])]) == [a, b, c]
    # a block failed its checksum mid-stream: a last message cuts the prefix to 1
    cut = [(0, 0, 10, memoryview(a + b[:2]), [10, 4, 7]), (0, 0, 0, (), (), 1)]
    assert run(cut) == [a]
    outs = [bytearray(10), bytearray(4), bytearray(7)]
    assert run([(0, 0, 10, memoryview(a + b), [10, 4])],
               outs=[memoryview(o) for o in outs]) == [a, b]
    assert outs[:2] == [bytearray(a), bytearray(b)]
    with pytest.raises(Exception, match="lengths"):
        run([(0, 0, 10, memoryview(a), [10, 4, 7, 1])])  # more blocks than keys
    with pytest.raises(Exception, match="first message"):
        run([(0, 0, 10, memoryview(a))])  # a prefix stream names its blocks
