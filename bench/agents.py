"""`splitserve bench agents`: many agents that share one long system prompt, at once.

Starts a cluster (1 prefill + 1 decode worker; on CUDA the store gets a gpu tier the
workers map over cuda_ipc) twice: with prefix reuse (the engines' prefix caches and the
store, the defaults) and without it (prefix caching off, ``kvstore.prefix_reuse``
off: every agent's prompt is computed whole). Each run sends ``--agents`` requests at
once, each the shared prefix plus a short task of its own, and prints the TTFT of
each run (median, mean, max) and how many prompt tokens the store served.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings, Endpoint, ModelSettings
from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dummy:tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=8192, help="the shared system prompt")
    p.add_argument("--task-len", type=int, default=64, help="each agent's own tokens")
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="per worker (default: room for every agent's whole prompt)")
    p.add_argument("--store-gpu-gib", type=float, default=None,
                   help="the store's gpu tier (default: 8 on CUDA, none on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--log-dir", default=None,
                   help="keep each run's service logs under this folder (with-reuse/, without/)")


def _settings(args: argparse.Namespace, reuse: bool) -> ClusterSettings:
    prompt = args.prefix_len + args.task_len
    blocks = args.num_kv_blocks or (prompt + args.output_len) * args.agents // 16 + 64
    s = ClusterSettings(
        model=ModelSettings(name="bench", path=args.model, dtype=args.dtype,
                            device=args.device, max_model_len=prompt + args.output_len + 16,
                            num_kv_blocks=blocks, enable_prefix_caching=reuse,
                            max_num_batched_tokens=max(8192, args.task_len)),
        prefill=[Endpoint()], decode=[Endpoint()])
    s.kvstore.prefix_reuse = reuse
    gpu_gib = args.store_gpu_gib
    if gpu_gib is None:
        gpu_gib = 8.0 if args.device.startswith("cuda") else 0.0
    s.kvstore.cpu_bytes = 2 << 30 if gpu_gib else 1 << 30
    if gpu_gib:
        s.kvstore.tiers = [{"kind": "gpu", "bytes": int(gpu_gib * (1 << 30)),
                            "device": "cuda:0"},
                           {"kind": "cpu", "bytes": s.kvstore.cpu_bytes}]
    s.log_level = "info"  # the prefill worker's "prefilled" lines give the breakdown
    return with_free_ports(s)


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(3, 250) for _ in range(args.prefix_len)]
    return [prefix + [rng.randrange(3, 250) for _ in range(args.task_len)]
            for _ in range(args.agents)]


def _ttfts(address: str, prompts: list[list[int]], output_len: int) -> list[tuple[float, int]]:
    """All prompts at once -> (TTFT, cached prompt tokens) of each."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i: int, stub: generation_pb2_grpc.GenerationStub) -> None:
        req = generation_pb2.GenerateRequest(
            model="bench", prompt_token_ids=generation_pb2.TokenIds(ids=prompts[i]),
            sampling=common_pb2.SamplingParams(max_tokens=output_len, ignore_eos=True))
        start.wait()
        t0 = time.perf_counter()
        first, cached = 0.0, 0
        for resp in stub.Generate(req, timeout=600):
            if not first and resp.token_ids:
                first = time.perf_counter() - t0
            cached = max(cached, resp.usage.cached_tokens if resp.HasField("usage") else 0)
        out[i] = (first, cached)

    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        threads = [threading.Thread(target=one, args=(i, stub)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def _run_once(args: argparse.Namespace, reuse: bool, prompts: list[list[int]]) -> dict:
    """``prompts``: the warm-up's (another prefix), then the agents'; only the agents'
    burst is timed and counted."""
    settings = _settings(args, reuse)
    with tempfile.TemporaryDirectory(prefix="splitserve-agents-") as d:
        tmp = Path(d)
        if args.log_dir:
            tmp = Path(args.log_dir) / ("with-reuse" if reuse else "without")
            tmp.mkdir(parents=True, exist_ok=True)
        settings.dump_yaml(tmp / "cluster.yaml")
        with LocalCluster(settings, tmp / "cluster.yaml", tmp):
            _ttfts(settings.gateway.address, prompts[:1], 1)  # warm-up: another prefix
            before = store_get_bytes(settings.kvstore.http_port)
            got = _ttfts(settings.gateway.address, prompts[1:], args.output_len)
            fetched = store_get_bytes(settings.kvstore.http_port) - before
        parts = prefill_parts(tmp / "prefill-0.log", skip=1)
    ttft = [t for t, _ in got]
    return {"reuse": reuse, "ttft_median_ms": statistics.median(ttft) * 1000,
            "ttft_mean_ms": statistics.mean(ttft) * 1000, "ttft_max_ms": max(ttft) * 1000,
            "cached_tokens": sum(c for _, c in got), "store_get_mb": fetched / 1e6,
            "prefill_worker_ms": parts}


def prefill_parts(log_path: Path, skip: int) -> dict[str, float]:
    """Medians over the prefill worker's "prefilled" log lines (after the first
    ``skip``), ms: the store fetch, the first token and the whole call, from the
    call's start on the worker; what TTFT has beyond them is the gateway's."""
    rows = []
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "prefilled":
            rows.append(event)
    rows = rows[skip:]
    if not rows:
        return {}
    return {name: statistics.median(r[key] for r in rows) * 1000
            for name, key in (("fetch", "fetch_s"), ("first_token", "first_token_s"),
                              ("call", "seconds"))}


def store_get_bytes(http_port: int) -> float:
    """Bytes the store has handed out so far, over every transport (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = r'^splitserve_kvstore_transfer_bytes_total\{direction="get",[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = _prompts(args)
    warm = _prompts(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    result: dict[str, Any] = {"agents": args.agents, "prefix_len": args.prefix_len,
                              "task_len": args.task_len, "model": args.model}
    for reuse in (True, False):
        r = _run_once(args, reuse, warm[:1] + prompts)
        result["with" if reuse else "without"] = r
    w, wo = result["with"], result["without"]
    result["speedup_mean"] = wo["ttft_mean_ms"] / w["ttft_mean_ms"]
    print(f"{args.agents} agents, a shared {args.prefix_len}-token prefix + {args.task_len} "
          f"tokens each, all at once ({args.model}, {args.device}):")
    print(f"  {'':<16} {'TTFT median ms':>15} {'mean ms':>9} {'max ms':>9} {'cached tok':>11}"
          f" {'store out MB':>13}")
    for name, r in (("with reuse", w), ("without", wo)):
        print(f"  {name:<16} {r['ttft_median_ms']:>15.1f} {r['ttft_mean_ms']:>9.1f} "
              f"{r['ttft_max_ms']:>9.1f} {r['cached_tokens']:>11} {r['store_get_mb']:>13.1f}")
    print(f"  mean TTFT {result['speedup_mean']:.1f}x lower with reuse")
    for name, r in (("with reuse", w), ("without", wo)):
        p = r["prefill_worker_ms"]
        if p:
            print(f"  {name}: on the prefill worker (median ms) store fetch "
                  f"{p['fetch']:.1f}, first token {p['first_token']:.1f}, whole call "
                  f"{p['call']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
