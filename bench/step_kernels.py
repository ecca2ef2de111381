"""Which kernels a decode step spends its GPU time in (torch profiler; not a test).

    python3 -m bench.step_kernels --model dummy:llama-3.1-8b [--enforce-eager]

Runs one request's prefill, warms up decode steps, then profiles ``--steps``
decode steps and prints the top kernels by GPU time, the GPU time per step and
the wall time per step (their difference is time the GPU waits on the host).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16", device="cuda",
                                    max_model_len=args.prompt + 256, max_num_seqs=args.batch,
                                    enforce_eager=args.enforce_eager), use_tqdm=False)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [7] * args.prompt, params)
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    gpu = sum(e.self_device_time_total for e in events) / args.steps / 1000
    print(f"{args.model} batch {args.batch} eager={args.enforce_eager}: wall {wall * 1e3:.3f} "
          f"ms/step (under the profiler), GPU kernels {gpu:.3f} ms/step")
    for e in events[:18]:
        print(f"  {e.self_device_time_total / args.steps / 1000:8.3f} ms/step "
              f"{e.count // args.steps:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
