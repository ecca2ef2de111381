"""Hand-rolled protobuf wire encoding of the two bulk messages, PutChunk and BlockData.

The generated classes copy a payload several times (into a bytes object, into the
message, out again when serializing). Here a message is built with one copy of the
payload (``b"".join`` of memoryview slices) and parsed with none (the payload is a
memoryview into the received bytes). The bytes are standard protobuf: a peer using the
generated code reads and writes the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.v1 import kvstore_pb2

_PUTCHUNK_DATA_TAG = b"\x22"  # field 4, length-delimited
_BLOCKDATA_DATA_TAG = b"\x1a"  # field 3, length-delimited


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(raw: bytes | memoryview):
    """Yields (field number, wire type, value start, value end, field start) of raw."""
    mv = raw if isinstance(raw, memoryview) else memoryview(raw)
    pos, n = 0, len(mv)
    while pos < n:
        start = pos
        tag, pos = _read_varint(mv, pos)
        fnum, wt = tag >> 3, tag & 7
        if wt == 0:
            vstart = pos
            _, pos = _read_varint(mv, pos)
        elif wt == 1:
            vstart, pos = pos, pos + 8
        elif wt == 2:
            ln, vstart = _read_varint(mv, pos)
            pos = vstart + ln
        elif wt == 5:
            vstart, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > n:
            raise ValueError("truncated message")
        yield fnum, wt, vstart, pos, start


# -- PutChunk ---------------------------------------------------------------------------
def encode_put_chunk(header: bytes, pieces: Sequence[memoryview], size: int) -> bytes:
    """A PutChunk: ``header`` (serialized fields 1-3, or b"") + the pieces as ``data``."""
    return b"".join([header, _PUTCHUNK_DATA_TAG, varint(size), *pieces])


def decode_put_chunk(raw: bytes) -> tuple[kvstore_pb2.PutChunk, memoryview]:
    """(the message without its data, a view of the data)."""
    mv = memoryview(raw)
    rest: list[memoryview] = []
    data = mv[0:0]
    for fnum, wt, vstart, end, start in _fields(mv):
        if fnum == 4 and wt == 2:
            data = mv[vstart:end]
        else:
            rest.append(mv[start:end])
    return kvstore_pb2.PutChunk.FromString(b"".join(rest)), data


# -- BlockData --------------------------------------------------------------------------
class BlockChunk:
    """A parsed BlockData: ``data`` is a memoryview into the received message."""

    __slots__ = ("index", "offset", "length", "data", "lengths", "num_blocks")

    def __init__(self, index: int, offset: int, length: int, data: memoryview,
                 lengths: list[int] | None = None, num_blocks: int = 0) -> None:
        self.index, self.offset, self.length, self.data = index, offset, length, data
        self.lengths = lengths or []
        self.num_blocks = num_blocks


def encode_block_data(index: int, offset: int, length: int, data: memoryview | Sequence[memoryview],
                      lengths: Sequence[int] = (), num_blocks: int = 0) -> bytes:
    """A BlockData; ``data`` may be several pieces (joined with the one copy)."""
    pieces = [data] if isinstance(data, memoryview | bytes) else list(data)
    head = bytearray()
    if index:
        head += b"\x08" + varint(index)
    if offset:
        head += b"\x10" + varint(offset)
    if length:
        head += b"\x20" + varint(length)
    if lengths:
        packed = b"".join(varint(n) for n in lengths)
        head += b"\x2a" + varint(len(packed)) + packed
    if num_blocks:
        head += b"\x30" + varint(num_blocks)
    size = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
    return b"".join([head, _BLOCKDATA_DATA_TAG, varint(size), *pieces])


def decode_block_data(raw: bytes) -> BlockChunk:
    mv = memoryview(raw)
    index = offset = length = num_blocks = 0
    data = mv[0:0]
    lengths: list[int] = []
    for fnum, wt, vstart, end, _ in _fields(mv):
        if wt == 0:
            value = _read_varint(mv, vstart)[0]
            if fnum == 1:
                index = value
            elif fnum == 2:
                offset = value
            elif fnum == 4:
                length = value
            elif fnum == 5:
                lengths.append(value)
            elif fnum == 6:
                num_blocks = value
        elif fnum == 3 and wt == 2:
            data = mv[vstart:end]
        elif fnum == 5 and wt == 2:  # packed repeated uint64
            pos = vstart
            while pos < end:
                value, pos = _read_varint(mv, pos)
                lengths.append(value)
    return BlockChunk(index, offset, length, data, lengths, num_blocks)


def identity(b: bytes) -> bytes:
    return b
