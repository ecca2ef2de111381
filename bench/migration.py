"""``splitserve bench migration``: what a decode worker's death costs a stream.

A local cluster (1 prefill, 2 decode workers, the tiny model) serves one long
stream at a time; after ``--kill-after`` tokens the decode worker serving it is
killed (SIGKILL). Reported per trial: the gap in the client's stream (the longest
time between two tokens around the kill: detection, a new worker, the blocks from
the store, the rest of the last block recomputed) against the time to recompute the
same request from scratch (the TTFT of prompt + tokens so far as a new prompt).
The killed worker is started again for the next trial.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("migration benchmark")
    g.add_argument("--trials", type=int, default=5)
    g.add_argument("--prompt-len", type=int, default=400)
    g.add_argument("--max-tokens", type=int, default=400)
    g.add_argument("--kill-after", type=int, default=100, help="tokens before the kill")
    g.add_argument("--model", default="dummy:tiny-llama")


def _serving_decode(cluster: Any, settings: Any) -> int:
    import grpc

    from services.common.auth import call_metadata
    from splitserve.v1 import worker_pb2, worker_pb2_grpc

    for i, ep in enumerate(settings.decode):
        with grpc.insecure_channel(ep.address) as ch:
            load = worker_pb2_grpc.DecodeWorkerStub(ch).GetLoad(
                worker_pb2.LoadRequest(), timeout=5, metadata=call_metadata(settings))
        if load.running:
            return i
    raise RuntimeError("no decode worker is running the stream")


def _trial(cluster: Any, stub: Any, args: argparse.Namespace, seed: int) -> dict[str, float]:
    from splitserve.v1 import common_pb2, generation_pb2

    rng = random.Random(seed)
    prompt = [rng.randrange(3, 255) for _ in range(args.prompt_len)]
    req = generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    times, tokens, killed = [], [], []

    def kill() -> None:  # beside the reader, which must keep reading to time the gap
        killed.append(_serving_decode(cluster, cluster.settings))
        cluster.kill("decode", killed[0])

    killer = threading.Thread(target=kill)
    for msg in stub.Generate(req, timeout=120):
        now = time.perf_counter()
        times += [now] * len(msg.token_ids)
        tokens += msg.token_ids
        if len(tokens) >= args.kill_after and not killer.is_alive() and not killed:
            killer.start()
    killer.join()
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    again = generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt + tokens[: args.kill_after]),
        sampling=common_pb2.SamplingParams(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    list(stub.Generate(again, timeout=60))
    recompute = time.perf_counter() - start
    cluster.start_service("decode", killed[0])
    time.sleep(1.5)  # the gateway's next polls find it again (reconnect backoff <= 1 s)
    return {"gap_s": gap, "recompute_s": recompute, "tokens": len(tokens)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from services.common.launcher import LocalCluster, with_free_ports
    from services.common.settings import ClusterSettings, Endpoint
    from splitserve.v1 import generation_pb2_grpc

    settings = ClusterSettings()
    settings.model.path = args.model
    settings.model.max_model_len = args.prompt_len + args.max_tokens + 16
    settings.decode = [Endpoint(), Endpoint()]
    with_free_ports(settings)
    tmp = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    config = tmp / "cluster.yaml"
    settings.dump_yaml(config)
    cluster = LocalCluster(settings, config, tmp).start()
    channel = grpc.insecure_channel(settings.gateway.address)
    try:
        stub = generation_pb2_grpc.GenerationStub(channel)
        _trial(cluster, stub, args, seed=-1)  # warm-up
        trials = [_trial(cluster, stub, args, seed=i) for i in range(args.trials)]
    finally:
        channel.close()
        cluster.stop()
    gaps = [t["gap_s"] for t in trials]
    recomputes = [t["recompute_s"] for t in trials]
    assert all(t["tokens"] == args.max_tokens for t in trials), trials
    result = {"trials": trials, "median_gap_s": statistics.median(gaps),
              "median_recompute_s": statistics.median(recomputes)}
    print(f"{args.trials} kills after {args.kill_after} of {args.max_tokens} tokens, "
          f"{args.prompt_len}-token prompts: stream gap median "
          f"{1e3 * result['median_gap_s']:.1f} ms (max {1e3 * max(gaps):.1f}); recomputing "
          f"the request instead: median {1e3 * result['median_recompute_s']:.1f} ms to its "
          "next token; every stream completed with all its tokens")
    return result
