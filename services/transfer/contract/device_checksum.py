"""The checksum of blocks that live in GPU memory (the gpu tier, the cuda_ipc transport).

crc32 is serial per byte and would make every device block a trip through the host, so
device blocks carry a position-weighted sum instead, computed where the bytes are:

    words   = the block's bytes as little-endian int32 (blocks are whole words)
    weight  = 2 * (i mod 32768) + 1              (odd: every single bit flip shows)
    dsum32  = sum(words[i] * weight[i])  modulo 2**32

A flipped bit, a zeroed span or two swapped words change it. Integer sums modulo 2**32
depend neither on the order of the additions nor on the width they are computed in, so
the Triton kernel that checksums while it copies (:mod:`services.transfer.device_copy`,
int32 arithmetic that wraps) and :func:`dsum32` here (torch int64, on any device)
agree bit for bit. A block's checksum kind follows its tier: moving a block between the
gpu tier and a host tier verifies it with the one and stamps it with the other.
"""

from __future__ import annotations

from typing import Any

WEIGHT_MASK = 0x7FFF  # the weights cycle every 32768 words: 2 * (i & mask) + 1
KIND_CRC32 = "crc32"
KIND_DSUM32 = "dsum32"
_weights: dict[tuple[str, int], Any] = {}


def _weights_for(words: int, device: Any) -> Any:
    import torch

    key = (str(device), words)
    w = _weights.get(key)
    if w is None:
        w = (torch.arange(words, dtype=torch.int64, device=device) & WEIGHT_MASK) * 2 + 1
        _weights[key] = w
    return w


def fold(sums: Any) -> list[int]:
    """dsum32 values from weighted sums (an integer tensor of any device, any width)."""
    return [int(v) & 0xFFFFFFFF for v in sums.tolist()]


def dsum32(rows: Any) -> list[int]:
    """The checksum of each row of a ``[n, nbytes]`` uint8 tensor (any device)."""
    import torch

    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.shape[1] % 4:
        raise ValueError(f"a block of {rows.shape[1]} bytes is not whole 4-byte words")
    words = rows.contiguous().view(torch.int32)  # [n, nbytes / 4]
    w = _weights_for(words.shape[1], words.device)
    return fold((words.to(torch.int64) * w).sum(dim=1))
