"""The copy+dsum32 kernel and its call's table and partial sums, run by Triton's CPU
interpreter (tests/gpu runs them compiled, captured in a CUDA graph)."""

from __future__ import annotations

import os
import threading
import types

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # set by conftest.py where there is no GPU
    pytest.skip("runs under Triton's interpreter; tests/gpu runs the kernel compiled",
                allow_module_level=True)

from services.transfer import device_copy as dc  # noqa: E402
from services.transfer.contract.device_checksum import dsum32  # noqa: E402

CHUNK = 2048  # smaller than the compiled one: blocks of several chunks stay small here


class _CpuPlan(dc._Plan):
    """The plan's table and partial sums in plain CPU memory, launched eagerly."""

    def __init__(self, cap: int, words: int, write: bool) -> None:
        self.device, self.cap, self.words, self.write, self.align = (
            torch.device("cpu"), cap, words, write, 16)
        self.chunks = -(-words // CHUNK)
        self.lock = threading.Lock()
        self._table = torch.zeros(dc.HEAD + 2 * cap, dtype=torch.int64)
        self._table_dev = torch.zeros_like(self._table)
        self._partials = torch.zeros(cap * self.chunks, dtype=torch.int32)
        self._sums = torch.zeros(cap, dtype=torch.int32)
        self.views()
        self.graph, self.eager = None, True

    def kernel(self) -> None:
        dc._copy_sum_kernel[(self.cap, self.chunks)](
            self._table_dev, self._partials, self.cap, self.words, CHUNK=CHUNK,
            WRITE=self.write, MASK=dc.WEIGHT_MASK, ALIGN=16)


@pytest.fixture(autouse=True)
def no_cuda_stream(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(synchronize=lambda: None))


def _small_words(nbytes: int) -> torch.Tensor:
    """Bytes whose int32 words are 0..3: the interpreter sums in numpy and refuses a
    sum past int32, where compiled int32 arithmetic wraps (the checksum's own)."""
    t = torch.zeros(nbytes, dtype=torch.uint8)
    t.view(-1, 4)[:, 0] = torch.randint(0, 4, (nbytes // 4,), dtype=torch.uint8)
    return t


@pytest.mark.parametrize("write", [True, False])
def test_blocks_are_copied_in_any_order_and_summed_per_block(write):
    nbytes, n = 3 * CHUNK * 4 + 64, 5  # three chunks and a part of one
    src = _small_words(n * nbytes + 128)
    dst = torch.zeros(n * nbytes + 4096, dtype=torch.uint8)
    src_at = [i * nbytes for i in range(n)][::-1]
    dst_at = [64 + i * nbytes for i in range(n)]
    plan = _CpuPlan(8, nbytes // 4, write)
    got = plan.run(src_at, src.data_ptr(), dst_at if write else (),
                   dst.data_ptr() if write else 0)
    assert got == dsum32(torch.stack([src[o : o + nbytes] for o in src_at]))
    if write:
        assert all(torch.equal(dst[d : d + nbytes], src[s : s + nbytes])
                   for s, d in zip(src_at, dst_at, strict=True))
        assert not dst[:64].any()  # nothing outside the blocks
    assert plan.table[0] == n
    assert not plan.sums[n:].any()  # programs past n blocks did nothing


def test_a_second_smaller_call_gets_only_its_own_sums():
    nbytes = 2 * CHUNK * 4
    src = _small_words(4 * nbytes)
    plan = _CpuPlan(8, nbytes // 4, False)
    first = plan.run([0, nbytes, 2 * nbytes], src.data_ptr(), (), 0)
    again = plan.run([nbytes, 0], src.data_ptr(), (), 0)
    assert again == first[1::-1]  # no sum of the first call leaks into the second
