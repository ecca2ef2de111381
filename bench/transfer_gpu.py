"""`bench transfer --gpu`: the cuda_ipc transport against a store with a gpu tier.

Device payloads in (put: device -> the store's gpu arena, dsum32 on the way), out into
fresh device buffers (get) and into preallocated ones (get_into); and the blocks the
store keeps in its cpu tier read straight to this GPU (its pinned shared memory ->
device): the host -> device rate of the pinned cpu tier, for blocks a host writer put
there (crc32 verified on host threads) and for blocks the gpu tier demoted there (their
dsum32 verified on the device after the copy); and the other way, device -> the pinned
cpu tier, for puts that a gpu tier full of pinned blocks spills there.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.transfer import _gbps
from services.common.settings import TransferSettings
from services.transfer.bulk import crcs, threads
from services.transfer.device_copy import copy_blocks
from services.transfer.store_client import KVStoreClient

Span = tuple[str, float, float]  # a step: its name, from, to


def measure_device(client: KVStoreClient, data: bytes, block: int, count: int,
                   repeat: int) -> dict[str, Any]:
    rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(count, block).cuda()
    payloads = list(rows.unbind(0))
    outs = torch.empty_like(rows)
    host_payloads = [memoryview(data)[i * block : (i + 1) * block] for i in range(count)]
    times: dict[str, list[float]] = {"put": [], "get": [], "get_into": [],
                                     "cpu_tier_to_gpu": []}
    rounds: list[list[bytes]] = []
    with KVStoreClient(client.address, TransferSettings(transport="shm")) as host:
        for r in range(repeat + 1):
            owner = f"bench-gpu-{os.getpid()}-{r}"
            keys = [os.urandom(16) for _ in range(count)]
            rounds.append(keys)
            hkeys = [os.urandom(16) for _ in range(count)]
            host.put(owner, hkeys, host_payloads, block)  # lands in the cpu tier
            settle(client)
            t0 = time.perf_counter()
            res = client.put(owner, keys, payloads, block)
            t1 = time.perf_counter()
            got = client.get(owner, keys)
            t2 = time.perf_counter()
            client.get(owner, keys, out=list(outs.unbind(0)))
            t3 = time.perf_counter()
            settle(client)
            t4 = time.perf_counter()
            from_host = client.get(owner, hkeys)
            t5 = time.perf_counter()
            client.release(owner)
            if r == 0:
                _check(res.stored, count, got, outs, from_host, rows)
                continue
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
                times[k].append(dt)
            del got, from_host
    steps: dict[str, float] = {}
    notes: list[str] = []
    timeline: list[Span] = []
    times.update(full_gpu_tier(client, rounds[1:], payloads, block, rows, steps, notes,
                               timeline))
    result: dict[str, Any] = {k: _gbps(block * count, v) for k, v in times.items()}
    result["spill_notes"] = notes
    result["spill_steps_ms"] = steps
    result["spill_timeline_ms"] = timeline
    result["kernel"] = kernel_rate(rows, repeat)
    result["plain_copy"] = plain_copy_rate(rows, repeat)
    result["cpu_tier_parts"] = host_parts(data, block, count, repeat)
    return result


def settle(client: KVStoreClient, timeout_s: float = 10.0) -> None:
    """Waits until the store has no move between tiers queued or under way (the
    promotion of blocks the last round read in place, demotions making room), so that a
    timed copy has the link to itself."""
    deadline = time.monotonic() + timeout_s
    while client.stats().moves_pending and time.monotonic() < deadline:
        time.sleep(0.002)


MAX_FILLS = 64  # puts of one round each that fill the gpu tier, at most
MAX_ROOMY = 3  # puts meant to spill that were not held in the cpu tier (noted), at most


def full_gpu_tier(client: KVStoreClient, rounds: list[list[bytes]], payloads: list,
                  block: int, rows: torch.Tensor, steps: dict[str, float],
                  notes: list[str], timeline: list[Span]) -> dict[str, list[float]]:
    """Pinned puts of new blocks fill the gpu tier, pushing the rounds' (released)
    blocks down to the cpu tier, until a fill spills: the gpu tier has no room to
    promote the read blocks into while they are read (that would share the link with
    the read). The store's background moves (promotions queued when the rounds'
    owners released their blocks) are waited for first, or one could land in the
    room a later put expects to be full. -> seconds of a
    get of each round's demoted blocks ("demoted_to_gpu"), and of as many puts of new
    blocks that the full gpu tier spills into the cpu tier ("gpu_to_cpu_tier": this
    GPU -> the page-locked arena, dsum32 summed on the device); ``steps``: the median
    milliseconds of each step of those puts (:func:`timed_steps`); ``timeline``: the
    steps of the median put, each from and to (:func:`median_timeline`); ``notes``: the
    puts meant to spill that did not (:func:`_note_not_spilled`), not timed."""
    owner = f"bench-fill-{os.getpid()}"
    settle(client)
    fill_gpu_tier(client, owner, payloads, block)
    times: dict[str, list[float]] = {"demoted_to_gpu": [], "gpu_to_cpu_tier": []}
    for keys in rounds:
        settle(client)
        t0 = time.perf_counter()
        got = client.get(owner, keys)
        times["demoted_to_gpu"].append(time.perf_counter() - t0)
        if not torch.equal(torch.stack(got), rows):
            raise RuntimeError("demoted blocks came back different")
    parts: dict[str, list[float]] = {}
    timelines: list[tuple[float, list[Span]]] = []
    while len(times["gpu_to_cpu_tier"]) < len(rounds):
        keys = [os.urandom(16) for _ in payloads]
        settle(client)
        put_steps: dict[str, list[float]] = {}
        spans: list[Span] = []
        with timed_steps(client.transport, put_steps, spans):
            t0 = time.perf_counter()
            res = client.put(owner, keys, payloads, block)
            seconds = time.perf_counter() - t0
        where = client.lookup_per_tier(keys)
        if where.get("cpu") != len(keys):
            _note_not_spilled(client, res, where, notes)
            fill_gpu_tier(client, owner, payloads, block)
            continue
        times["gpu_to_cpu_tier"].append(seconds)
        timelines.append((seconds, [(n, a - t0, b - t0) for n, a, b in spans]))
        for k, v in put_steps.items():
            parts.setdefault(k, []).extend(v)
        if not torch.equal(torch.stack(client.get(owner, keys)), rows):
            raise RuntimeError("spilled blocks came back different")
    client.release(owner)
    steps.update({k: round(statistics.median(v) * 1e3, 3) for k, v in parts.items()})
    timeline[:] = median_timeline(timelines)
    return times


def median_timeline(timelines: list[tuple[float, list[Span]]]) -> list[Span]:
    """The steps of the put of median time, in milliseconds from its call, the put
    itself last."""
    if not timelines:
        return []
    seconds, spans = sorted(timelines, key=lambda t: t[0])[len(timelines) // 2]
    ms = sorted(((n, round(a * 1e3, 2), round(b * 1e3, 2)) for n, a, b in spans),
                key=lambda s: s[1])
    return [*ms, ("put", 0.0, round(seconds * 1e3, 2))]


def fill_gpu_tier(client: KVStoreClient, owner: str, payloads: list, block: int) -> None:
    """Pinned puts of new blocks until one spills to the cpu tier."""
    for _ in range(MAX_FILLS):
        keys = [os.urandom(16) for _ in payloads]
        client.put(owner, keys, payloads, block)
        if client.lookup_per_tier(keys).get("cpu") == len(keys):
            return
    raise RuntimeError(f"{MAX_FILLS} pinned puts did not fill the gpu tier")


def _note_not_spilled(client: KVStoreClient, res: Any, where: dict[str, int],
                      notes: list[str]) -> None:
    """A put meant to spill was not held in the cpu tier: noted with what its commit
    answered, where its blocks are and the store's state (at most MAX_ROOMY times,
    then an error)."""
    s = client.stats()
    tiers = ", ".join(f"{t.tier} {t.blocks} blocks {t.used_bytes}/{t.capacity_bytes} B"
                      for t in s.tiers)
    notes.append(f"a put meant to spill stored {res.stored} (present {res.present}), held "
                 f"as {where} (pinned blocks {s.pinned_blocks}, checksum failures "
                 f"{s.checksum_failures}, evictions {s.evictions}, demotions "
                 f"{s.demotions}; {tiers})")
    if len(notes) > MAX_ROOMY:
        raise RuntimeError("; ".join(notes))


# a spilled put's steps, as the probe names them: the transport module's functions
# and the stub's RPCs it wraps, and the waits on the copies
_STEPS = ("checksum_blocks", "copy_runs")


@contextlib.contextmanager
def timed_steps(transport: Any, seconds: dict[str, list[float]],
                spans: list[Span] | None = None) -> Iterator[None]:
    """Times the steps of the cuda_ipc transport's calls inside the block (the bench's
    probe: its module functions, the BeginPut and CommitPut RPCs, the waits on CUDA
    streams and events)
    -> ``seconds[step]`` gains each call's total per step; ``spans`` (when given) each
    step's (name, perf_counter at its start, at its end)."""
    from services.transfer import cuda_ipc_transport as mod

    spent: dict[str, float] = dict.fromkeys(
        (*_STEPS, "on_device", "BeginPut", "CommitPut", "wait"), 0.0)

    def timed(name: str, fn: Callable) -> Callable:
        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t1 = time.perf_counter()
                spent[name] += t1 - t0
                if spans is not None:
                    spans.append((name, t0, t1))
        return call

    stub, waits = transport._stub, (torch.cuda.Event, torch.cuda.Stream)
    syncs = [kind.synchronize for kind in waits]
    saved = {n: getattr(mod, n) for n in _STEPS}
    rpcs = {n: getattr(stub, n) for n in ("BeginPut", "CommitPut")}
    try:
        for n, fn in saved.items():
            setattr(mod, n, timed(n, fn))
        for n, fn in rpcs.items():
            setattr(stub, n, timed(n, fn))
        for kind, sync in zip(waits, syncs, strict=True):
            kind.synchronize = timed("wait", sync)
        transport._on_device = timed("on_device", transport._on_device)  # this one
        yield
    finally:
        transport.__dict__.pop("_on_device", None)
        for kind, sync in zip(waits, syncs, strict=True):
            kind.synchronize = sync
        for n, fn in saved.items():
            setattr(mod, n, fn)
        for n, fn in rpcs.items():
            setattr(stub, n, fn)
    for n, s in spent.items():
        seconds.setdefault(n, []).append(s)


def kernel_rate(rows: torch.Tensor, repeat: int) -> dict[str, float]:
    """The copy-and-checksum kernel alone (what a hand-off costs on the device, without
    the control RPCs): ``rows`` copied block by block to another buffer, GB/s."""
    flat, out = rows.view(-1), torch.empty_like(rows).view(-1)
    n, nbytes = rows.shape
    offs = [i * nbytes for i in range(n)]
    return _timed_rate(lambda: copy_blocks(flat, offs, out, offs, nbytes), n * nbytes, repeat)


def plain_copy_rate(rows: torch.Tensor, repeat: int) -> dict[str, float]:
    """One contiguous device-to-device copy of the same bytes (no checksum, no offsets):
    the rate the kernel is measured against, GB/s."""
    flat, out = rows.view(-1), torch.empty_like(rows).view(-1)
    return _timed_rate(lambda: out.copy_(flat), flat.numel(), repeat)


def host_parts(data: bytes, block: int, count: int, repeat: int) -> dict[str, Any]:
    """The two halves of a cpu-tier read to this GPU, each alone: one DMA of the bytes
    from page-locked memory, and the crc32 of the blocks on the host threads, GB/s; and
    the DMA from shared memory page-locked by registration (as the store's arena is),
    in one copy and block by block."""
    pinned = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
    pinned.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dev = torch.empty(len(data), dtype=torch.uint8, device="cuda")
    view = memoryview(pinned.numpy())
    blocks = [view[i * block : (i + 1) * block] for i in range(count)]
    dma = _timed_rate(lambda: dev.copy_(pinned, non_blocking=True), len(data), repeat)
    shm_dma = registered_dma(data, block, count, dev, repeat)
    seconds = []
    for _ in range(max(3, repeat)):
        t0 = time.perf_counter()
        crcs(blocks)
        seconds.append(time.perf_counter() - t0)
    return {"dma": dma, "crc32": _gbps(len(data), seconds), "threads": threads(), **shm_dma}


def registered_dma(data: bytes, block: int, count: int, dev: torch.Tensor,
                   repeat: int) -> dict[str, Any]:
    """DMA rates from a shared memory segment page-locked with cudaHostRegister."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=len(data))
    try:
        return _dma_from(torch.frombuffer(shm.buf, dtype=torch.uint8), data, block, count,
                         dev, repeat)
    finally:
        with contextlib.suppress(BufferError):
            shm.close()
        shm.unlink()


def _dma_from(host: torch.Tensor, data: bytes, block: int, count: int, dev: torch.Tensor,
              repeat: int) -> dict[str, Any]:
    from services.transfer.device_copy import pin_host, unpin_host

    host.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if not pin_host(host.data_ptr(), host.numel()):
        return {}
    rows = [(dev[i * block : (i + 1) * block], host[i * block : (i + 1) * block])
            for i in range(count)]

    def by_block() -> None:
        for d, h in rows:
            d.copy_(h, non_blocking=True)

    try:
        return {"shm_pinned": host.is_pinned(),
                "shm_dma": _timed_rate(lambda: dev.copy_(host, non_blocking=True), len(data),
                                       repeat),
                "shm_dma_blocks": _timed_rate(by_block, len(data), repeat),
                # the other way (a spilled put's copies): device -> registered memory
                "shm_dma_to_host": _timed_rate(lambda: host.copy_(dev, non_blocking=True),
                                               len(data), repeat)}
    finally:
        unpin_host(host.data_ptr())


def _timed_rate(call, nbytes: int, repeat: int) -> dict[str, float]:
    """GB/s of ``call`` timed with CUDA events around it, after one warm (compiling) call."""
    call()
    seconds = []
    for _ in range(max(3, repeat)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return _gbps(nbytes, seconds)


def _check(stored: int, count: int, got: list[torch.Tensor], outs: torch.Tensor,
           from_host: list[torch.Tensor], rows: torch.Tensor) -> None:
    if stored != count:
        raise RuntimeError(f"stored {stored} of {count} blocks")
    if not (torch.equal(torch.stack(got), rows) and torch.equal(outs, rows)
            and torch.equal(torch.stack(from_host), rows)):
        raise RuntimeError("blocks came back different")
