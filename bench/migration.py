"""``splitserve bench migration``: what a decode worker's death costs a stream.

A local cluster (1 prefill, 2 decode workers; the engine and the store of
``--config``, the tiny model on the CPU by default) serves one long stream at a time;
after ``--kill-after`` tokens the decode worker serving it is killed (SIGKILL).
Reported per trial: the gap in the client's stream (the longest time between two
tokens from the kill on: detection, a new worker, the blocks from
the store, the rest of the last block recomputed) against the time to recompute the
same request from scratch (the TTFT of prompt + tokens so far as a new prompt).
The killed worker is started again for the next trial.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench import interrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("migration benchmark")
    g.add_argument("--trials", type=int, default=5)
    g.add_argument("--prompt-len", type=int, default=400)
    g.add_argument("--max-tokens", type=int, default=400)
    g.add_argument("--kill-after", type=int, default=100, help="tokens before the kill")
    interrupted.add_cluster_arguments(g)


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
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 255) for _ in range(args.prompt_len)]
    if seed < 0:  # the warm-up: a stream on each decode worker (round robin), no kill
        for _ in cluster.settings.decode:
            list(stub.Generate(interrupted.request(prompt, args.max_tokens), timeout=120))
        return {}
    killed: list[int] = []

    def kill() -> None:
        killed.append(_serving_decode(cluster, cluster.settings))
        cluster.kill("decode", killed[0])

    stream = interrupted.request(prompt, args.max_tokens)
    times, tokens = interrupted.timed_stream(stub, stream, args.kill_after, kill)
    recompute = interrupted.recompute_s(stub, prompt + tokens[: args.kill_after])
    if seed < args.trials - 1:  # the next trial needs two decode workers again
        cluster.start_service("decode", killed[0])
        time.sleep(1.5)  # the gateway's next polls find it again (reconnect backoff <= 1 s)
    return {"gap_s": interrupted.longest_gap(times, args.kill_after), "recompute_s": recompute,
            "tokens": len(tokens)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.common.settings import WorkerEndpoint

    settings = interrupted.base_settings(args)
    settings.prefill = [WorkerEndpoint()]
    settings.decode = [WorkerEndpoint(), WorkerEndpoint()]
    result = interrupted.measure(args, "migration", settings,
                                 lambda cluster, stub, seed: _trial(cluster, stub, args, seed),
                                 ("gap_s", "recompute_s"))
    print(f"{args.trials} kills after {args.kill_after} of {args.max_tokens} tokens, "
          f"{args.prompt_len}-token prompts: stream gap median "
          f"{1e3 * result['median_gap_s']:.1f} ms (max "
          f"{1e3 * max(t['gap_s'] for t in result['trials']):.1f}); recomputing "
          f"the request instead: median {1e3 * result['median_recompute_s']:.1f} ms to its "
          "next token; every stream completed with all its tokens")
    return result
