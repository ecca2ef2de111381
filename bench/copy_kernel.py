"""Where a cuda_ipc hand-off's copy call spends its time (a CUDA machine).

``python3 -m bench.copy_kernel --mib 64 --block-kib 1792``: ``copy_blocks`` over the
blocks of a hand-off (device to device, dsum32 on the way), timed three ways: the
caller's wall clock per call, CUDA events around the call, and the kernel alone (its
launches queued behind a sleep, so host time is hidden); against one plain device copy
of the same bytes. ``--sweep`` times the kernel for other chunk sizes and warp counts.
GB/s = 1e9 B/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from services.transfer import device_copy as dc

MiB = 1 << 20


def _wall_us(call: Callable[[], object], repeat: int) -> float:
    call()
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds) * 1e6


def _event_us(call: Callable[[], object], repeat: int) -> float:
    call()
    seconds = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) * 1000)
    return statistics.median(seconds)


def _queued_us(launch: Callable[[], object], launches: int = 20) -> float:
    """Device time per ``launch``, queued behind a sleep so host time is hidden."""
    launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)
    start.record()
    for _ in range(launches):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / launches


def _plan_for(src: torch.Tensor, dst: torch.Tensor, offs: list[int], nbytes: int) -> dc._Plan:
    plan = dc._plan(src.device, len(offs), nbytes // 4, True, 16)
    plan.run(offs, src.data_ptr(), offs, dst.data_ptr())
    return plan


def _steps_us(plan: dc._Plan, src: torch.Tensor, dst: torch.Tensor, offs: list[int],
              nbytes: int, repeat: int) -> dict[str, float]:
    """Median microseconds of each step of a call, taken one by one as ``copy_blocks``
    and the plan's ``run`` take them."""
    steps: dict[str, list[float]] = {k: [] for k in ("check", "table", "start", "wait",
                                                     "sums")}
    stream = torch.cuda.current_stream()
    for _ in range(repeat):
        t = [time.perf_counter()]
        dc._check(src, offs, nbytes) and dc._check(dst, offs, nbytes)
        t.append(time.perf_counter())
        plan.write_table(offs, src.data_ptr(), offs, dst.data_ptr())
        t.append(time.perf_counter())
        plan.start()
        t.append(time.perf_counter())
        stream.synchronize()
        t.append(time.perf_counter())
        plan.sums[: len(offs)].tolist()
        t.append(time.perf_counter())
        for k, a, b in zip(steps, t, t[1:], strict=False):
            steps[k].append(b - a)
    return {k: statistics.median(v) * 1e6 for k, v in steps.items()}


def _sweep(plan: dc._Plan, total: int) -> None:
    for chunk in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            grid = (plan.cap, dc.triton.cdiv(plan.words, chunk))

            def launch(chunk: int = chunk, warps: int = warps, grid: tuple = grid) -> None:
                dc._copy_sum_kernel[grid](plan._table_dev, plan._partials, plan.cap,
                                          plan.words, CHUNK=chunk, WRITE=True,
                                          MASK=dc.WEIGHT_MASK, ALIGN=16, num_warps=warps)

            us = _queued_us(launch)
            print(f"  sweep: chunk {chunk:>5} words, {warps:>2} warps {us:8.1f} us "
                  f"{total / us / 1e3:8.1f} GB/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--block-kib", type=int, default=1792)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="other chunk sizes and warp counts")
    args = p.parse_args(argv)
    nbytes = args.block_kib * 1024
    n = max(1, args.mib * MiB // nbytes)
    src = torch.randint(0, 255, (n * nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    offs = [i * nbytes for i in range(n)]
    total = n * nbytes

    def call() -> list[int]:
        return dc.copy_blocks(src, offs, dst, offs, nbytes)

    if call() != dc.dsum32(src.view(n, nbytes)) or not torch.equal(src, dst):
        raise RuntimeError("copy_blocks gave other bytes or checksums than torch")
    plan = _plan_for(src, dst, offs, nbytes)
    rows = {
        "copy_blocks, wall clock per call": _wall_us(call, args.repeat),
        "copy_blocks, CUDA events around it": _event_us(call, args.repeat),
        "the kernel alone on the device": _queued_us(plan.kernel),
        "the call's graph alone on the device": _queued_us(plan.start),
        "one plain device copy": _event_us(lambda: dst.copy_(src), args.repeat),
    }
    how = "replays a CUDA graph" if plan.graph else "launches eagerly"
    print(f"copy+dsum32 of {total / MiB:.0f} MiB in {n} blocks of {args.block_kib} KiB "
          f"(median of {args.repeat}; the call {how}):")
    for name, us in rows.items():
        print(f"  {name:<40} {us:9.1f} us {total / us / 1e3:9.1f} GB/s")
    steps = _steps_us(plan, src, dst, offs, nbytes, args.repeat)
    print("  the call's steps, median us: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    if args.sweep:
        _sweep(plan, total)


if __name__ == "__main__":
    main()
