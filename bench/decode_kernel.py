"""Sweep the decode attention kernel's launch shape on a GPU (not a test).

    python3 -m bench.decode_kernel

For each case (a batch shape of a benchmark workload) and each ``DecodeLaunch``,
prints the kernel time (split + merge) and the K/V bytes read per second.
"""

from __future__ import annotations

import itertools
import random

import torch

from services.engine.attention import triton_kernels as tk

CASES = {  # name: (batch, kv heads, query heads, head dim, context lengths' range)
    "qwen3-0.6b 256 seqs": (256, 8, 16, 128, (356, 1536)),
    "llama-8b batch 1": (1, 8, 32, 128, (384, 384)),
    "llama-8b batch 1, 8K": (1, 8, 32, 128, (8192, 8192)),
    "llama-8b 64 seqs": (64, 8, 32, 128, (512, 2048)),
}
BLOCK_SIZE = 16


def _case(batch: int, kvh: int, heads: int, d: int, span: tuple[int, int]) -> tuple:
    rng = random.Random(0)
    lens = [rng.randint(*span) for _ in range(batch)]
    width = -(-max(lens) // BLOCK_SIZE)
    blocks = batch * width
    cache = torch.randn(blocks, BLOCK_SIZE, kvh, d, dtype=torch.bfloat16, device="cuda")
    vcache = torch.randn_like(cache)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int64).to(torch.int32)
    tables = tables.view(batch, width)
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kv_bytes = sum(lens) * kvh * d * 2 * 2
    return q, cache, vcache, tables, seq_lens, max(lens), kv_bytes


def _time(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1000


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    launches = [tk.DecodeLaunch(n, w, s) for n, w, s in
                itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]
    for name, (batch, kvh, heads, d, span) in CASES.items():
        q, kc, vc, tables, lens, longest, kv_bytes = _case(batch, kvh, heads, d, span)
        split = tk.decode_split(longest, batch, kvh, sms)
        out = torch.empty_like(q)
        rows = []
        args = (q, kc, vc, tables, lens, d**-0.5, split, out)
        for launch in launches:
            try:
                sec = _time(lambda a=args, launch=launch: tk.decode_attention(*a, launch))
            except Exception as exc:  # noqa: BLE001 (a shape the GPU cannot run)
                print(f"  {launch}: {type(exc).__name__}")
                continue
            rows.append((sec, launch))
        rows.sort(key=lambda r: r[0])
        print(f"== {name}: split {split}, {kv_bytes / 1e6:.1f} MB of K/V")
        for sec, launch in rows[:6]:
            print(f"  {sec * 1e6:8.1f} us  {kv_bytes / sec / 1e9:7.0f} GB/s  {launch}")
        default = next(sec for sec, launch in rows if launch == tk.DECODE_LAUNCH)
        print(f"  default {tk.DECODE_LAUNCH}: {default * 1e6:.1f} us")


if __name__ == "__main__":
    main()
