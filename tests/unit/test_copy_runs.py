"""copy_runs: one copy per run of blocks adjacent in both buffers, the bytes where they
belong, and offsets outside a buffer refused (on the CPU; tests/gpu runs it between
page-locked host memory and a GPU inside the cuda_ipc transport)."""

from __future__ import annotations

import pytest
import torch

from services.transfer.device_copy import copy_runs

NBYTES = 64


def _source(blocks: int) -> torch.Tensor:
    return torch.randint(0, 256, (blocks * NBYTES,), dtype=torch.uint8)


def _blocks_at(t: torch.Tensor, offsets: list[int]) -> list[torch.Tensor]:
    return [t[o : o + NBYTES] for o in offsets]


@pytest.mark.parametrize("src_blocks, dst_blocks, copies", [
    ([0, 1, 2, 3], [0, 1, 2, 3], 1),  # one run
    ([0, 1, 2, 3], [4, 5, 0, 1], 2),  # the target breaks the run
    ([3, 2, 1, 0], [0, 1, 2, 3], 4),  # reversed: no two adjacent
    ([0, 1, 5, 6, 7], [2, 3, 4, 5, 6], 2),  # the source breaks the run
    ([7], [0], 1),
])
def test_copies_once_per_adjacent_run(src_blocks: list[int], dst_blocks: list[int],
                                      copies: int) -> None:
    src, dst = _source(8), torch.zeros(8 * NBYTES, dtype=torch.uint8)
    so, do = [b * NBYTES for b in src_blocks], [b * NBYTES for b in dst_blocks]
    assert copy_runs(src, so, dst, do, NBYTES) == copies
    for got, want in zip(_blocks_at(dst, do), _blocks_at(src, so), strict=True):
        assert torch.equal(got, want)
    untouched = set(range(8)) - set(dst_blocks)
    assert all(not dst[b * NBYTES : (b + 1) * NBYTES].any() for b in untouched)


def test_nothing_to_copy() -> None:
    assert copy_runs(_source(1), [], torch.zeros(NBYTES, dtype=torch.uint8), [], NBYTES) == 0


@pytest.mark.parametrize("src_off, dst_off", [([-NBYTES], [0]), ([0], [NBYTES]),
                                              ([NBYTES], [0])])
def test_refuses_a_block_outside_its_buffer(src_off: list[int], dst_off: list[int]) -> None:
    src, dst = _source(1), torch.zeros(NBYTES, dtype=torch.uint8)
    with pytest.raises(ValueError, match="runs outside"):
        copy_runs(src, src_off, dst, dst_off, NBYTES)
    assert not dst.any()


def test_refuses_unequal_offset_lists() -> None:
    with pytest.raises(ValueError, match="2 source offsets but 1"):
        copy_runs(_source(2), [0, NBYTES], torch.zeros(NBYTES, dtype=torch.uint8), [0],
                  NBYTES)
