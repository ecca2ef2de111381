"""The store calls of `bench transfer --gpu --mib 64 --repeat 5`, replayed against the
index with the H200 run's block counts (36 blocks a put, a gpu tier of 292 and a cpu
tier of 585; blocks 256x smaller, the gpu tier on the CPU) and the server's demoter at
its watermarks. On the H200 one put meant to spill a run landed in the gpu tier
instead: the fill before it had spilled while the demoter was still copying blocks
out, and the room they left was free by the next put. Here every fill that spills
leaves the gpu tier full of pinned blocks, and every timed put spills."""

from __future__ import annotations

import os

from kvstore.store import KVStoreCore
from kvstore.tiers import build_tiers
from splitserve.v1 import common_pb2
from tests.fixtures.device_puts import dsum, write_device_put
from tests.fixtures.store_books import settled

MiB = 1 << 20
BLOCK = 7168  # 1792 KiB / 256
COUNT, REPEAT = 36, 5  # 64 MiB of 1792 KiB blocks; the bench's timed rounds


class Bench:
    def __init__(self) -> None:
        gpu_bytes = (64 * MiB * (REPEAT + 2) + 64 * MiB) // 256
        tiers = build_tiers([{"kind": "gpu", "bytes": gpu_bytes, "device": "cpu"},
                             {"kind": "cpu", "bytes": 2 * gpu_bytes, "shm": False}], "r")
        self.gpu = tiers[0]
        self.core = KVStoreCore(tiers)
        self.core.set_watermarks(0.9, 0.8)  # the server's defaults
        self.payloads = [os.urandom(BLOCK) for _ in range(COUNT)]
        self.sums = [dsum(p) for p in self.payloads]

    def refs(self, keys: list[bytes]) -> list[common_pb2.BlockRef]:
        return [common_pb2.BlockRef(key=k, num_tokens=16) for k in keys]

    def device_put(self, owner: str, keys: list[bytes]) -> bool:
        """A cuda_ipc writer's put -> whether it spilled."""
        begun = self.core.begin_put(owner, self.refs(keys), BLOCK, device=True)
        write_device_put(self.core, begun, self.payloads, self.sums)
        return begun.spilled

    def device_get(self, owner: str, keys: list[bytes]) -> None:
        self.core.get(owner, keys, memory=True, device=True)

    def settle(self) -> None:
        settled(self.core, timeout_s=10, poll_s=0.002)

    def fill(self, owner: str) -> None:
        for _ in range(64):
            if self.device_put(owner, new_keys()):
                return
        raise AssertionError("the gpu tier never filled")

    def gpu_pinned_room(self) -> tuple[int, int]:
        """(free blocks, unpinned blocks) of the gpu tier."""
        blocks = [b for b in self.core._blocks.values() if b.tier is self.gpu]
        return (self.gpu.free_bytes // self.gpu.footprint(BLOCK),
                sum(1 for b in blocks if not b.pinners))


def new_keys() -> list[bytes]:
    return [os.urandom(16) for _ in range(COUNT)]


def test_every_put_the_bench_means_to_spill_spills() -> None:
    bench = Bench()
    core = bench.core
    rounds = []
    try:
        for r in range(REPEAT + 1):  # measure_device: host and device rounds
            owner, keys, hkeys = f"round-{r}", new_keys(), new_keys()
            rounds.append(keys)
            core.put(owner, bench.refs(hkeys), bench.payloads, BLOCK)
            bench.settle()
            bench.device_put(owner, keys)
            bench.device_get(owner, keys)
            bench.settle()
            bench.device_get(owner, hkeys)
            core.release(owner)
        bench.settle()
        bench.fill("fill")  # full_gpu_tier
        for keys in rounds[1:]:
            bench.settle()
            bench.device_get("fill", keys)
        bench.settle()
        free, unpinned = bench.gpu_pinned_room()
        assert free + unpinned < COUNT, "the fills left room for a put in the gpu tier"
        for _ in rounds[1:]:
            bench.settle()
            assert bench.device_put("fill", new_keys()), "a timed put did not spill"
    finally:
        core.release("fill")
        core.close()
