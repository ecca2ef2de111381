"""The gpu tier: a device arena owned by the store process, mapped by workers on the
same host through CUDA IPC (the ``cuda_ipc`` transport), which copy device to device.

Its blocks carry dsum32 checksums (:mod:`services.transfer.contract.device_checksum`),
computed on the device. The store itself moves blocks in and out of it (demotion to
the cpu tier, promotion from it) with plain copies through host memory. On a machine
without CUDA the same tier runs on ``device: cpu``: the store's bookkeeping is then
exercised without a GPU (tests), with no cuda_ipc to offer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import torch

from kvstore.tiers.allocator import SpanAllocator
from kvstore.tiers.base import BlockMeta, Slot, Tier
from kvstore.tiers.span import SpanTier
from services.transfer.bulk import address
from services.transfer.contract.device_checksum import KIND_DSUM32
from services.transfer.device_copy import checksum_blocks, pin_host

ALIGNMENT = 256  # cudaMalloc's; keeps every block a whole number of 16-byte vectors


class GpuTier(SpanTier):
    name = "gpu"
    has_view = False
    on_device = True
    checksum_kind = KIND_DSUM32

    def __init__(self, capacity_bytes: int, device: str = "cuda:0") -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"gpu tier capacity must be > 0 bytes, got {capacity_bytes}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"gpu tier on {device}: this process sees no CUDA device")
        self._alloc = SpanAllocator(capacity_bytes, alignment=ALIGNMENT)
        # zeros: the allocation is made (and the memory is ours) before the first put
        self.arena = torch.zeros(self._alloc.size, dtype=torch.uint8, device=self.device)

    def view(self, slot: Slot) -> memoryview:
        raise TypeError("the gpu tier's blocks are device memory: read_into / write them")

    def span(self, slot: Slot) -> torch.Tensor:
        return self.arena[slot.offset : slot.offset + slot.length]

    def read_into(self, slot: Slot, out: memoryview) -> None:
        self.read_many_into([slot], [out])

    def write(self, slot: Slot, data: memoryview, meta: BlockMeta) -> None:
        self.write_many([slot], [data], [meta])

    def read_many_into(self, slots: list[Slot], outs: list[memoryview]) -> None:
        for offset, host in host_runs(slots, outs):  # DMA when ``outs`` are page-locked
            host.copy_(self.arena[offset : offset + host.numel()], non_blocking=True)
        self._sync()  # the bytes are in ``outs`` on return

    def write_many(self, slots: list[Slot], datas: list[memoryview],
                   metas: list[BlockMeta]) -> None:
        for offset, host in host_runs(slots, datas):
            self.arena[offset : offset + host.numel()].copy_(host, non_blocking=True)
        self._sync()  # readers in other processes see them once the store commits them

    def checksum(self, slot: Slot) -> int:
        return self.checksums([slot])[0]

    def checksums(self, slots: list[Slot]) -> list[int]:
        by_length: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            by_length.setdefault(slot.length, []).append(i)
        sums = [0] * len(slots)
        for length, index in by_length.items():
            got = checksum_blocks(self.arena, [slots[i].offset for i in index], length)
            for i, c in zip(index, got, strict=True):
                sums[i] = c
        return sums

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # -- CUDA IPC -----------------------------------------------------------------------
    def ipc(self) -> dict[str, Any] | None:
        """What a same-host process needs to map the arena (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        (device, handle, size, offset, rc_handle, rc_offset, event_handle,
         event_sync) = self.arena.untyped_storage()._share_cuda_()
        props = torch.cuda.get_device_properties(self.device)
        return {"device": device, "handle": handle, "storage_bytes": size,
                "storage_offset": offset, "ref_counter_handle": rc_handle,
                "ref_counter_offset": rc_offset, "event_handle": event_handle or b"",
                "event_sync_required": bool(event_sync), "gpu_uuid": str(props.uuid),
                "arena_bytes": self._alloc.size}

    def close(self) -> None:
        self.arena = torch.empty(0, dtype=torch.uint8)


def host_runs(slots: list[Slot], views: list[memoryview]
              ) -> Iterator[tuple[int, torch.Tensor]]:
    """(arena offset, host bytes) for each run of blocks that lie back to back both in
    the arena and in host memory (a request's blocks, demoted together into one run of
    the cpu tier): one copy each, where a copy per block cost a launch per block and
    ran ~8% slower on the H200 (50.8 against 55.4 GB/s from page-locked memory). The
    caller keeps ``views`` alive until the copies are done."""
    if len(slots) != len(views):
        raise ValueError(f"{len(slots)} slots but {len(views)} host buffers")
    for slot, view in zip(slots, views, strict=True):
        if view.nbytes != slot.length:
            raise ValueError(f"a host buffer of {view.nbytes} bytes for a block of "
                             f"{slot.length}")
    addrs = [address(v) for v in views]
    start = 0
    for i in range(1, len(slots) + 1):
        if i < len(slots) and slots[i].offset == slots[i - 1].offset + slots[i - 1].length \
                and addrs[i] == addrs[i - 1] + slots[i - 1].length:
            continue
        length = slots[i - 1].offset + slots[i - 1].length - slots[start].offset
        memory = (ctypes.c_char * length).from_address(addrs[start])
        yield slots[start].offset, torch.frombuffer(memory, dtype=torch.uint8)
        start = i


def pin_host_tiers(tiers: list[Tier]) -> list[str]:
    """Page-locks the host memory tiers of a store that has a gpu tier on CUDA, so that
    moves between them (and cuda_ipc readers of the cpu arena) copy by DMA near the
    link's rate -> the tiers pinned."""
    if not any(t.on_device and getattr(t, "device", None) is not None
               and t.device.type == "cuda" for t in tiers):  # type: ignore[attr-defined]
        return []
    pinned = []
    for t in tiers:
        span = getattr(t, "host_span", None)
        if span is not None and pin_host(*span()):
            pinned.append(t.name)
    return pinned
