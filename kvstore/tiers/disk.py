"""The disk tier: one file per block under a directory, found again after a restart.

Why a file per block rather than an append-only segment log: blocks are immutable,
of one size, and leave in LRU order, i.e. at random. A file is freed by ``unlink``
and its space is reused by the filesystem at once; a log would need compaction
(rewriting live records) to reclaim space, i.e. more disk traffic and a second
index. Blocks are large (hundreds of KiB and more), so one inode each is cheap.

A file is written atomically: to ``.tmp-*`` in the same directory, (fsync,) then
``rename`` to ``<seq>.kv``; a process killed mid-write leaves only a temp file, which
the next start-up deletes. A file holds a header (magic, key, length, crc32 of the
payload, crc32 of the header itself) then the payload. Start-up reads headers only
(a 1 TiB tier would take minutes to read through); the payload's crc32 is checked by
the store on every read, so a corrupt block is a miss, never served.

A slot's ``offset`` is the file's sequence number, unique for the life of the
directory: a reader whose file was unlinked under it (the block moved up) gets
FileNotFoundError, never another block's bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from pathlib import Path

from kvstore.tiers.base import BlockMeta, Found, Slot, Tier

MAGIC = b"SSKVBLK1"
# magic, flags (bit 0: partial), key length, num_tokens, payload length, payload crc32
_HEAD = struct.Struct("<8sBxHIQI")
_CRC = struct.Struct("<I")
PAGE = 4096
ADMIT_RULES = ("all", "seen")  # seen: only blocks whose key was looked up or read before


def header(meta: BlockMeta, length: int) -> bytes:
    h = _HEAD.pack(MAGIC, int(meta.partial), len(meta.key), meta.num_tokens, length,
                   meta.checksum & 0xFFFFFFFF) + meta.key
    return h + _CRC.pack(zlib.crc32(h))


def parse_header(raw: bytes) -> tuple[BlockMeta, int, int] | None:
    """(meta, payload length, header length) of a file's first bytes, or None."""
    if len(raw) < _HEAD.size:
        return None
    magic, flags, klen, ntok, length, crc = _HEAD.unpack_from(raw)
    end = _HEAD.size + klen
    if magic != MAGIC or not 0 < klen <= 64 or len(raw) < end + _CRC.size:
        return None
    if _CRC.unpack_from(raw, end)[0] != zlib.crc32(raw[:end]):
        return None
    return BlockMeta(bytes(raw[_HEAD.size : end]), crc, ntok, bool(flags & 1)), length, \
        end + _CRC.size


class DiskTier(Tier):
    """``capacity_bytes`` of block files under ``path`` (created if need be)."""

    name = "disk"
    has_view = False

    def __init__(self, capacity_bytes: int, path: str | os.PathLike, *, fsync: bool = True,
                 admit: str = "all") -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"disk tier capacity must be > 0 bytes, got {capacity_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_dir(self.path)
        self.fsync = fsync
        self.admit = admit
        self._capacity = capacity_bytes
        self._used = 0
        self._next_seq = 1
        self.rejected_at_scan = 0  # files found torn or with a bad header at start-up

    # -- Tier -------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def footprint(self, nbytes: int) -> int:
        return -(-(nbytes + 128) // PAGE) * PAGE  # header + payload, in whole pages

    def allocate(self, nbytes: int) -> Slot | None:
        need = self.footprint(nbytes)
        if self._used + need > self._capacity:
            return None
        self._used += need
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return Slot(seq, nbytes)

    def free(self, slot: Slot) -> None:
        self._used -= self.footprint(slot.length)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(slot.offset))

    def view(self, slot: Slot) -> memoryview:
        raise TypeError("the disk tier has no view: use read_into/write")

    def read_into(self, slot: Slot, out: memoryview) -> None:
        """The payload of ``slot`` into ``out``; FileNotFoundError when the file is gone,
        ValueError when its header is not this block's (the caller counts it corrupt)."""
        with open(self._file(slot.offset), "rb", buffering=0) as f:
            head = f.read(_HEAD.size + 64 + _CRC.size)
            parsed = parse_header(head)
            if parsed is None or parsed[1] != slot.length or len(out) != slot.length:
                raise ValueError(f"block file {slot.offset:016x} has a bad header")
            n = os.preadv(f.fileno(), [out], parsed[2])
            if n != slot.length:
                raise ValueError(f"block file {slot.offset:016x} is short ({n} bytes)")

    def write(self, slot: Slot, data: memoryview, meta: BlockMeta) -> None:
        final = self._file(slot.offset)
        tmp = final.with_name(f".tmp-{final.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            head = header(meta, len(data))
            done = os.writev(fd, [head, data])
            if done != len(head) + len(data):  # rare: a short write, finish it plainly
                rest = (bytes(head) + bytes(data))[done:]
                while rest:
                    rest = rest[os.write(fd, rest):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, final)

    def sync(self) -> None:
        """The renames done so far survive a power loss (fsync of the directory)."""
        if not self.fsync:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def scan(self) -> list[Found]:
        """Every intact block file, oldest first; temp files (torn writes) and files with
        a bad header or the wrong size are deleted; over capacity, the oldest go."""
        found: list[tuple[float, Found]] = []
        for entry in os.scandir(self.path):
            name = entry.name
            if name.startswith(".tmp-"):  # a write cut short: never renamed, never served
                self._discard(entry.path, counted=False)
                continue
            if not name.endswith(".kv"):
                continue
            try:
                seq = int(name[:-3], 16)
                st = entry.stat()
                with open(entry.path, "rb", buffering=0) as f:
                    parsed = parse_header(f.read(_HEAD.size + 64 + _CRC.size))
            except (ValueError, OSError):
                parsed = None
            if parsed is None or st.st_size != parsed[2] + parsed[1]:
                self._discard(entry.path)
                continue
            self._next_seq = max(self._next_seq, seq + 1)
            found.append((st.st_mtime, Found(Slot(seq, parsed[1]), parsed[0])))
        found.sort(key=lambda f: (f[0], f[1].slot.offset))
        kept = [f for _, f in found]
        total = sum(self.footprint(f.slot.length) for f in kept)
        while kept and total > self._capacity:  # the tier shrank since: oldest go
            gone = kept.pop(0)
            total -= self.footprint(gone.slot.length)
            self._discard(str(self._file(gone.slot.offset)), counted=False)
        self._used = total
        return kept

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the flock goes with it
            self._lock_fd = -1

    def _discard(self, path: str, counted: bool = True) -> None:
        self.rejected_at_scan += counted
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _file(self, seq: int) -> Path:
        return self.path / f"{seq:016x}.kv"


def _lock_dir(path: Path) -> int:
    """An exclusive flock on ``path/LOCK``: two stores on one directory would reuse each
    other's file names. A killed store's lock goes with its process."""
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another KV store uses the disk tier directory {path}; give each "
                         "store its own kvstore.tiers[].path") from None
    return fd
