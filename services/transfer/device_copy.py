"""Block copies in GPU memory that compute each block's dsum32 on the way, in one launch.

The cuda_ipc transport moves blocks between a worker's buffers and the store's gpu
arena with these: one pass over the bytes both copies and checksums them, so a hand-off
runs at the device's copy rate. The kernel takes each block's source and target as
offsets from two base addresses in a small table, so one launch serves any buffers; the
whole call (a one-program kernel that fetches the table from page-locked host memory,
the copy kernel, which sums each chunk of a block, and a small kernel that adds the
chunks' sums up and writes each block's sum straight into page-locked host memory) is
a CUDA graph captured once per (device, block size, table size). A call packs the
offsets into the table, replays the graph, waits and reads the sums: ~10 us of host
work, where building tensors and launching through Triton took ~100-150 (at 64 MiB as
long as the copy itself). Without Triton (or on the CPU) the same results
come from torch ops (:func:`dsum32`).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence

import numpy as np
import torch

from services.transfer.contract.device_checksum import WEIGHT_MASK, dsum32

CHUNK = 8192  # int32 words per program (32 KiB): among the fastest of a sweep on the H200
WARPS = 8
MIN_TABLE = 8  # blocks a table holds at least; tables grow by powers of two
SUM_TILE = 8192  # partial sums one program of the last kernel adds up

try:  # pragma: no cover - a GPU machine
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["cap", "words"])
    def _copy_sum_kernel(table, partials, cap, words, CHUNK: tl.constexpr,
                         WRITE: tl.constexpr, MASK: tl.constexpr, ALIGN: tl.constexpr):
        # table: [n, source base, target base, source offset x cap, target offset x cap]
        # (int64); programs past the call's n blocks (the graph's grid is sized for the
        # table) do nothing
        b = tl.program_id(0)
        if b < tl.load(table):
            c = tl.program_id(1)
            idx = c * CHUNK + tl.arange(0, CHUNK)
            mask = idx < words
            # addresses are data: say they are ALIGN-byte multiples, or every access
            # would be a 4-byte one
            src = tl.multiple_of((tl.load(table + 1) + tl.load(table + 3 + b))
                                 .to(tl.pointer_type(tl.int32)), ALIGN)
            x = tl.load(src + idx, mask=mask, other=0)
            if WRITE:
                dst = tl.multiple_of((tl.load(table + 2) + tl.load(table + 3 + cap + b))
                                     .to(tl.pointer_type(tl.int32)), ALIGN)
                tl.store(dst + idx, x, mask=mask)
            weight = ((idx & MASK) << 1) | 1
            # int32 products and sums wrap modulo 2**32, the checksum's own arithmetic
            tl.store(partials + b * tl.num_programs(1) + c, tl.sum(x * weight, axis=0))

    @triton.jit
    def _sum_kernel(table, partials, sums, chunks, ROWS: tl.constexpr,
                    COLS: tl.constexpr):
        # each program adds up the partial sums of ROWS blocks and writes each block's
        # dsum32 into page-locked host memory (a posted write over the link); a kernel
        # with atomics in the copy's programs instead slowed the copy by a quarter
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        live = rows < tl.load(table)
        parts = tl.load(partials + rows[:, None] * chunks + cols[None, :],
                        mask=live[:, None] & (cols[None, :] < chunks), other=0)
        tl.store(sums + rows, tl.sum(parts, axis=1), mask=live)

    @triton.jit
    def _stage_kernel(src, dst, size, BLOCK: tl.constexpr):
        # one program copies the call's table from page-locked host memory to the device
        i = tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < size), mask=i < size)

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

HEAD = 3  # the table's first words: n, the source base address, the target base address


class _Plan:
    """The buffers and captured graph of calls with up to ``cap`` blocks of ``words``
    int32 words on one device. One call at a time (its lock)."""

    def __init__(self, device: torch.device, cap: int, words: int, write: bool,
                 align: int) -> None:
        self.device, self.cap, self.words, self.write, self.align = (device, cap, words,
                                                                      write, align)
        self.chunks = -(-words // CHUNK)
        self.lock = threading.Lock()
        self._table = torch.zeros(HEAD + 2 * cap, dtype=torch.int64, pin_memory=True)
        self._table_dev = torch.zeros_like(self._table, device=device)
        self._partials = torch.zeros(cap * self.chunks, dtype=torch.int32, device=device)
        # the last kernel writes each block's sum into page-locked host memory itself:
        # nothing to copy back or add up after it
        self._sums = torch.zeros(cap, dtype=torch.int32, pin_memory=True)
        self.views()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # capture failed: launch directly

    def views(self) -> None:
        """The table and the sums as host views made once, and the table's packers per
        call size: a call's host work is a few microseconds."""
        self.table = self._table.numpy()
        self.sums = self._sums.numpy().view(np.uint32)  # dsum32s are unsigned
        self.targets_at = (HEAD + self.cap) * 8
        self._packers: dict[int, tuple[struct.Struct, struct.Struct]] = {}

    def run(self, src: Sequence[int], src_base: int, dst: Sequence[int],
            dst_base: int) -> list[int]:
        """Copies (and sums) the blocks at byte offsets ``src`` from ``src_base`` to
        ``dst`` from ``dst_base`` (absolute addresses) -> their dsum32s."""
        with self.lock:
            self.write_table(src, src_base, dst, dst_base)
            self.start()
            torch.cuda.current_stream(self.device).synchronize()
            return self.sums[: len(src)].tolist()

    def write_table(self, src: Sequence[int], src_base: int, dst: Sequence[int],
                    dst_base: int) -> None:
        n = len(src)
        packers = self._packers.get(n)
        if packers is None:
            packers = self._packers[n] = (struct.Struct(f"<{HEAD + n}q"),
                                          struct.Struct(f"<{n}q"))
        packers[0].pack_into(self.table, 0, n, src_base, dst_base, *src)
        if self.write:
            packers[1].pack_into(self.table, self.targets_at, *dst)

    def start(self) -> None:
        """The call's work on the current stream: the graph, else launches (the first
        call compiles the kernels, then captures them)."""
        if self.graph is not None:
            self.graph.replay()
            return
        self.launch()
        if not self.eager:
            self._capture()

    def launch(self) -> None:
        self.stage()
        self.kernel()
        self.add_up()

    def stage(self) -> None:
        """The table to the device by a one-program kernel: a copy-engine transfer in
        the graph (and another for the sums back) cost ~15 us of device time a call."""
        size = self._table.numel()
        _stage_kernel[(1,)](self._table, self._table_dev, size,
                            BLOCK=triton.next_power_of_2(size))

    def kernel(self) -> None:
        _copy_sum_kernel[(self.cap, self.chunks)](
            self._table_dev, self._partials, self.cap, self.words, CHUNK=CHUNK,
            WRITE=self.write, MASK=WEIGHT_MASK, ALIGN=self.align, num_warps=WARPS)

    def add_up(self) -> None:
        cols = triton.next_power_of_2(self.chunks)
        rows = min(self.cap, max(1, SUM_TILE // cols))
        _sum_kernel[(-(-self.cap // rows),)](self._table_dev, self._partials, self._sums,
                                            self.chunks, ROWS=rows, COLS=cols)

    def _capture(self) -> None:
        """Captures the call on a side stream (after the eager call compiled the
        kernel); other threads' CUDA work goes on meanwhile (thread-local capture)."""
        torch.cuda.current_stream(self.device).synchronize()
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.launch()
                finally:
                    graph.capture_end()
        except RuntimeError:
            self.eager = True
            return
        self.graph = graph


_plans: dict[tuple[torch.device, int, int, bool, int], _Plan] = {}
_plans_lock = threading.Lock()


def _plan(device: torch.device, n: int, words: int, write: bool, align: int) -> _Plan:
    cap = max(MIN_TABLE, 1 << (n - 1).bit_length())
    key = (device, cap, words, write, align)
    plan = _plans.get(key)  # plans are only ever added: a lookup needs no lock
    if plan is None:
        with _plans_lock:
            plan = _plans.get(key)
            if plan is None:
                plan = _plans[key] = _Plan(device, cap, words, write, align)
    return plan


def copy_blocks(src: torch.Tensor, src_offsets: Sequence[int], dst: torch.Tensor | None,
                dst_offsets: Sequence[int], nbytes: int) -> list[int]:
    """Copies ``nbytes`` at each byte offset of ``src`` to the matching offset of ``dst``
    (flat uint8 tensors; ``dst`` None: checksum only) -> each block's dsum32. The
    kernel runs where both lie on one GPU; anything else (the CPU, host memory on one
    side: the transport moves those bytes with :func:`copy_runs`) is copied and summed
    by torch ops. Returns when the copies are done (it reads the checksums on the
    host)."""
    n = len(src_offsets)
    if n == 0:
        return []
    if nbytes % 4:
        raise ValueError(f"a block of {nbytes} bytes is not whole 4-byte words")
    vectors = _check(src, src_offsets, nbytes)
    if dst is not None:
        vectors = _check(dst, dst_offsets, nbytes) and vectors
    device = src.device
    if device.type != "cuda" or (dst is not None and dst.device != device) or \
            not HAVE_TRITON:
        return _copy_blocks_torch(src, src_offsets, dst, dst_offsets, nbytes)
    align = 16 if vectors and nbytes % 16 == 0 else 4
    plan = _plan(device, n, nbytes // 4, dst is not None, align)
    return plan.run(src_offsets, src.data_ptr(), dst_offsets if dst is not None else (),
                    dst.data_ptr() if dst is not None else 0)


def _check(t: torch.Tensor, offsets: Sequence[int], nbytes: int) -> bool:
    """Refuses a block that would run outside its buffer (the kernel gets addresses,
    unchecked: that would be another allocation's memory) -> whether every address is
    a 16-byte multiple. Builtins on the offsets: a hand-off's few dozen are checked in
    a microsecond or two, where numpy's calls cost more than the copy's own host work."""
    _check_bounds(t, offsets, nbytes)
    grain = math.gcd(t.data_ptr(), *offsets)  # every address is a multiple of it
    if grain % 4:
        raise ValueError("block offsets must be whole 4-byte words")
    return grain % 16 == 0


def _check_bounds(t: torch.Tensor, offsets: Sequence[int], nbytes: int) -> None:
    size = t.nbytes
    if min(offsets) < 0 or max(offsets) + nbytes > size:
        raise ValueError(f"a block of {nbytes} bytes at one of the offsets runs outside "
                         f"its {size}-byte buffer")


def _copy_blocks_torch(src: torch.Tensor, src_offsets: Sequence[int],
                       dst: torch.Tensor | None, dst_offsets: Sequence[int],
                       nbytes: int) -> list[int]:
    rows = torch.stack([src[o : o + nbytes] for o in src_offsets])
    if dst is not None:
        for row, o in zip(rows, dst_offsets, strict=True):
            dst[o : o + nbytes].copy_(row)
    return dsum32(rows)


def copy_runs(src: torch.Tensor, src_offsets: Sequence[int], dst: torch.Tensor,
              dst_offsets: Sequence[int], nbytes: int) -> int:
    """Copies ``nbytes`` at each byte offset of ``src`` to the matching offset of ``dst``
    (flat uint8 tensors) with one asynchronous copy per run of blocks that lie back to
    back in both -> the number of copies. Between page-locked host memory and a GPU
    each copy is one DMA at the link's rate, where a kernel reading or writing the host
    memory itself ran ~15% slower. The caller synchronizes (or orders work after the
    copies on the current stream)."""
    n = len(src_offsets)
    if n != len(dst_offsets):
        raise ValueError(f"{n} source offsets but {len(dst_offsets)} target offsets")
    if n == 0:
        return 0
    _check_bounds(src, src_offsets, nbytes)
    _check_bounds(dst, dst_offsets, nbytes)
    copies, start = 0, 0
    for i in range(1, n + 1):
        if (i < n and src_offsets[i] == src_offsets[i - 1] + nbytes
                and dst_offsets[i] == dst_offsets[i - 1] + nbytes):
            continue
        length = (i - start) * nbytes
        s, d = src_offsets[start], dst_offsets[start]
        dst[d : d + length].copy_(src[s : s + length], non_blocking=True)
        copies, start = copies + 1, i
    return copies


def write_token(host: torch.Tensor, offset: int, token: int, device: torch.device) -> None:
    """Enqueues, on ``device``'s current stream after the work already there, the write
    of ``token`` (8 bytes, little-endian) into page-locked ``host`` memory at
    ``offset``: a landing token, in host memory only once the copies before it are
    (kvstore.landing). The value goes as a kernel argument: nothing waits on the host."""
    value = torch.full((1,), token, dtype=torch.int64, device=device)
    host[offset : offset + 8].copy_(value.view(torch.uint8), non_blocking=True)


def pin_host(ptr: int, nbytes: int) -> bool:
    """Page-locks ``nbytes`` of host memory at ``ptr`` (shared memory mapped here) for
    DMA: host <-> device copies from it run near the link's rate -> whether it took."""
    if not torch.cuda.is_available() or nbytes <= 0:
        return False
    return torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0) == 0


def unpin_host(ptr: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(ptr)


def checksum_blocks(src: torch.Tensor, offsets: Sequence[int], nbytes: int) -> list[int]:
    """dsum32 of the blocks at ``offsets`` of ``src`` (no copy)."""
    return copy_blocks(src, offsets, None, (), nbytes)
