"""Block copies in GPU memory that compute each block's dsum32 on the way, in one launch.

The cuda_ipc transport moves blocks between a worker's buffers and the store's gpu
arena with these: one pass over the bytes both copies and checksums them, so a hand-off
runs at the device's copy rate. Blocks are addressed as int32-word offsets into one
base tensor per side (an arena, a staging buffer), so the kernel sees the same base
pointers at every call and compiles once. Without Triton (or on the CPU) the same
results come from torch ops (:func:`dsum32`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.transfer.contract.device_checksum import WEIGHT_MASK, dsum32, fold

CHUNK = 4096  # int32 words per program

try:  # pragma: no cover - a GPU machine
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n", "words"])
    def _copy_sum_kernel(src, offsets, dst, sums, n, words,
                         CHUNK: tl.constexpr, WRITE: tl.constexpr, MASK: tl.constexpr,
                         ALIGN: tl.constexpr):
        b = tl.program_id(0)
        c = tl.program_id(1)
        idx = c * CHUNK + tl.arange(0, CHUNK)
        mask = idx < words
        # block offsets are data: say they are ALIGN-word multiples, or every access
        # would be a 4-byte one
        s_base = tl.multiple_of(tl.load(offsets + b), ALIGN)
        x = tl.load(src + s_base + idx, mask=mask, other=0)
        if WRITE:
            d_base = tl.multiple_of(tl.load(offsets + n + b), ALIGN)
            tl.store(dst + d_base + idx, x, mask=mask)
        weight = ((idx & MASK) << 1) | 1
        # int32 products and sums wrap modulo 2**32, the checksum's own arithmetic, so
        # the chunks' sums meet in one int32 per block with no reduction pass after
        tl.atomic_add(sums + b, tl.sum(x * weight, axis=0), sem="relaxed")

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.int32) if t.dtype == torch.uint8 else t.view(-1)


def _base_offset(t: torch.Tensor) -> int:
    return t.data_ptr() % 64


def _alignment(byte_counts: Sequence[int]) -> int:
    """4 int32 words (16 bytes, one vector access) when every offset and the bases are
    multiples of 16 bytes; else 1."""
    return 4 if all(c % 16 == 0 for c in byte_counts) else 1


def _offsets(src_offsets: Sequence[int], dst_offsets: Sequence[int],
             device: torch.device) -> torch.Tensor:
    """Both sides' block offsets in int32 words, in one tensor (one host-to-device copy)."""
    byte_offsets = [*src_offsets, *dst_offsets]
    if any(o % 4 for o in byte_offsets):
        raise ValueError("block offsets must be whole 4-byte words")
    host = torch.tensor([o // 4 for o in byte_offsets], dtype=torch.int64)
    return host.to(device, non_blocking=True)


def copy_blocks(src: torch.Tensor, src_offsets: Sequence[int], dst: torch.Tensor | None,
                dst_offsets: Sequence[int], nbytes: int) -> list[int]:
    """Copies ``nbytes`` at each byte offset of ``src`` to the matching offset of ``dst``
    (both flat uint8 tensors on one device; ``dst`` None: checksum only) -> each block's
    dsum32. Returns when the copies are done (it reads the checksums on the host)."""
    n = len(src_offsets)
    if n == 0:
        return []
    if nbytes % 4:
        raise ValueError(f"a block of {nbytes} bytes is not whole 4-byte words")
    if src.device.type != "cuda" or not HAVE_TRITON:
        return _copy_blocks_torch(src, src_offsets, dst, dst_offsets, nbytes)
    words = nbytes // 4
    write = dst is not None
    offsets = _offsets(src_offsets, dst_offsets if write else (), src.device)
    sums = torch.zeros(n, dtype=torch.int32, device=src.device)
    align = _alignment([*src_offsets, *dst_offsets, nbytes, _base_offset(src),
                        _base_offset(dst if write else src)])
    grid = (n, triton.cdiv(words, CHUNK))
    _copy_sum_kernel[grid](_words(src), offsets, _words(dst) if write else _words(src),
                           sums, n, words, CHUNK=CHUNK, WRITE=write, MASK=WEIGHT_MASK,
                           ALIGN=align, num_warps=8)
    return fold(sums)


def _copy_blocks_torch(src: torch.Tensor, src_offsets: Sequence[int],
                       dst: torch.Tensor | None, dst_offsets: Sequence[int],
                       nbytes: int) -> list[int]:
    rows = torch.stack([src[o : o + nbytes] for o in src_offsets])
    if dst is not None:
        for row, o in zip(rows, dst_offsets, strict=True):
            dst[o : o + nbytes].copy_(row)
    return dsum32(rows)


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
