"""The copy+dsum32 kernel on CUDA: its captured graph serves any buffers and sizes."""

from __future__ import annotations

import torch

from services.transfer import device_copy
from services.transfer.contract.device_checksum import dsum32
from services.transfer.device_copy import checksum_blocks, copy_blocks

NBYTES = 64 * 1024 + 48  # not a whole number of the kernel's chunks


def _rows(n: int, nbytes: int = NBYTES) -> torch.Tensor:
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, device="cuda")


def test_replayed_graph_copies_between_new_buffers_every_call():
    for n in (1, 3, 8, 9, 40):  # tables of 8, 16 and 64 blocks
        for _ in range(3):  # the first call captures, the others replay
            rows = _rows(n)
            out = torch.zeros_like(rows)
            order = list(range(n))[::-1]
            sums = copy_blocks(rows.view(-1), [i * NBYTES for i in range(n)], out.view(-1),
                               [j * NBYTES for j in order], NBYTES)
            assert sums == dsum32(rows)
            assert torch.equal(out.flip(0), rows)
    assert any(p.graph is not None for p in device_copy._plans.values())


def test_checksums_only_and_unaligned_blocks():
    rows = _rows(5, 4100)  # 4-byte words, not 16-byte vectors
    flat = rows.view(-1)
    assert checksum_blocks(flat, [i * 4100 for i in range(5)], 4100) == dsum32(rows)
    out = torch.zeros(5 * 4100 + 4, dtype=torch.uint8, device="cuda")
    sums = copy_blocks(flat, [0, 4100], out, [4, 4104], 4100)
    assert sums == dsum32(rows[:2])
    assert torch.equal(out[4:8204], flat[:8200])
