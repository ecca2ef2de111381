"""`splitserve bench ttft`: time to first (and second) token, split path vs one engine.

The same prompts go through the single-process engine and through a local
cluster (gateway -> prefill worker -> store -> decode worker). The difference of
the medians is what disaggregation adds on this machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings, Endpoint, ModelSettings
from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

# Round trips before the first token: client -> gateway -> prefill worker -> store (its
# prefix fetch). The decode worker's hop comes after the first token.
HOPS = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dummy:tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--transport", default="auto",
                   choices=["auto", "grpc", "shm", "ucx", "cuda_ipc"])
    p.add_argument("--store-gpu-gib", type=float, default=None,
                   help="give the store a gpu tier of this size before its cpu tier "
                        "(default: 2 with --transport cuda_ipc, else none)")
    p.add_argument("--seed", type=int, default=0)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(length)] for _ in range(n)]


def _engine_times(args: argparse.Namespace, prompts: list[list[int]]) -> list[tuple[float, float]]:
    import torch

    from services.common.worker import cpu_threads
    from services.engine import EngineConfig, LLMEngine, SamplingParams
    from services.transfer.memory import tune_malloc

    tune_malloc()  # the workers' processes run with it too
    if args.device == "cpu":  # as many threads as one worker of the cluster gets
        torch.set_num_threads(cpu_threads(_cluster_settings(args)))
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                    max_model_len=args.prompt_len + 64, num_kv_blocks=256,
                                    max_num_batched_tokens=max(1024, args.prompt_len)),
                       use_tqdm=False)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    times = []
    for i, ids in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"r{i}", ids, params)
        stamps = []
        while engine.has_unfinished():
            for out in engine.step():
                stamps += [time.perf_counter()] * len(out.new_token_ids)
        times.append((stamps[0] - start, stamps[1] - start))
    return times


def _cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    s = ClusterSettings(
        model=ModelSettings(name="bench", path=args.model, dtype=args.dtype, device=args.device,
                            max_model_len=args.prompt_len + 64, num_kv_blocks=256,
                            max_num_batched_tokens=max(1024, args.prompt_len)),
        prefill=[Endpoint()], decode=[Endpoint()],
    )
    s.transfer.transport = args.transport
    gpu_gib = args.store_gpu_gib
    if gpu_gib is None:
        gpu_gib = 2.0 if args.transport == "cuda_ipc" else 0.0
    if gpu_gib > 0:
        s.kvstore.tiers = [{"kind": "gpu", "bytes": int(gpu_gib * (1 << 30)),
                            "device": "cuda:0"},
                           {"kind": "cpu", "bytes": s.kvstore.cpu_bytes}]
    s.log_level = "warning"
    return with_free_ports(s)


def _split_times(args: argparse.Namespace, prompts: list[list[int]]) -> list[tuple[float, float]]:
    settings = _cluster_settings(args)
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as d:
        tmp = Path(d)
        settings.dump_yaml(tmp / "cluster.yaml")
        with LocalCluster(settings, tmp / "cluster.yaml", tmp), \
                grpc.insecure_channel(settings.gateway.address) as channel:
            return _timed_requests(generation_pb2_grpc.GenerationStub(channel), prompts)


def _timed_requests(stub: generation_pb2_grpc.GenerationStub, prompts: list[list[int]]
                    ) -> list[tuple[float, float]]:
    """(TTFT, time to the second token) of each prompt through a gateway."""
    times = []
    for ids in prompts:
        req = generation_pb2.GenerateRequest(
            model="bench", prompt_token_ids=generation_pb2.TokenIds(ids=ids),
            sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True))
        start = time.perf_counter()
        stamps = []
        for resp in stub.Generate(req, timeout=120):
            stamps += [time.perf_counter()] * len(resp.token_ids)
        times.append((stamps[0] - start, stamps[1] - start))
    return times


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = _prompts(args.warmup + args.runs, args.prompt_len, args.seed)
    result: dict[str, Any] = {"prompt_len": args.prompt_len, "runs": args.runs,
                              "model": args.model, "transport": args.transport}
    for name, measure in (("engine", _engine_times), ("split", _split_times)):
        times = measure(args, prompts)[args.warmup:]
        result[f"{name}_ttft_ms"] = _median_ms([t[0] for t in times])
        result[f"{name}_second_token_ms"] = _median_ms([t[1] for t in times])
    added = result["split_ttft_ms"] - result["engine_ttft_ms"]
    result["added_ttft_ms"] = added
    result["added_per_hop_ms"] = added / HOPS
    print(f"TTFT, {args.prompt_len}-token prompt, median of {args.runs} ({args.model}, "
          f"transport {args.transport}):")
    print(f"  {'path':<8} {'first token ms':>15} {'second token ms':>16}")
    for name in ("engine", "split"):
        print(f"  {name:<8} {result[f'{name}_ttft_ms']:>15.2f} "
              f"{result[f'{name}_second_token_ms']:>16.2f}")
    print(f"  added by the split path: {added:.2f} ms to TTFT "
          f"({result['added_per_hop_ms']:.2f} ms per hop over {HOPS} hops)")
    return result
