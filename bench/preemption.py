"""``splitserve bench preemption``: what being preempted costs a stream.

A local cluster (1 prefill worker, 1 decode worker with one seat, the tiny model)
serves a long low-priority stream; after ``--preempt-after`` tokens a short
high-priority request arrives and takes the seat. Reported per trial: the
stream's pause (its longest gap between two tokens), the resume latency (from the
high-priority request's last token to the stream's next one: the seat seen free,
the blocks from the store, the partial last block recomputed), against recomputing
the paused request from scratch (the TTFT of prompt + tokens so far as a new
prompt).
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
    g = parser.add_argument_group("preemption benchmark")
    g.add_argument("--trials", type=int, default=5)
    g.add_argument("--prompt-len", type=int, default=400)
    g.add_argument("--max-tokens", type=int, default=400)
    g.add_argument("--preempt-after", type=int, default=100, help="tokens before the arrival")
    g.add_argument("--high-tokens", type=int, default=16, help="the high request's answer")
    g.add_argument("--model", default="dummy:tiny-llama")


def _request(prompt: list[int], max_tokens: int, priority: int) -> Any:
    from splitserve.v1 import common_pb2, generation_pb2

    return generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt), priority=priority,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _trial(stub: Any, args: argparse.Namespace, seed: int) -> dict[str, float]:
    from splitserve.v1 import common_pb2

    rng = random.Random(seed)
    prompt = [rng.randrange(3, 255) for _ in range(args.prompt_len)]
    high_prompt = [rng.randrange(3, 255) for _ in range(32)]
    times: list[float] = []
    tokens: list[int] = []
    high_end: list[float] = []

    def high() -> None:
        req = _request(high_prompt, args.high_tokens, common_pb2.PRIORITY_CLASS_HIGH)
        for _ in stub.Generate(req, timeout=120):
            pass
        high_end.append(time.perf_counter())

    arrival = threading.Thread(target=high)
    low = _request(prompt, args.max_tokens, common_pb2.PRIORITY_CLASS_BATCH)
    for msg in stub.Generate(low, timeout=120):
        now = time.perf_counter()
        times += [now] * len(msg.token_ids)
        tokens += msg.token_ids
        if len(tokens) >= args.preempt_after and not arrival.is_alive() and not high_end:
            arrival.start()
    arrival.join()
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    resumed = next(t for t in times if t > high_end[0])
    again = _request(prompt + tokens[: args.preempt_after], 1, common_pb2.PRIORITY_CLASS_HIGH)
    start = time.perf_counter()
    list(stub.Generate(again, timeout=60))
    recompute = time.perf_counter() - start
    return {"pause_s": gap, "resume_s": resumed - high_end[0], "recompute_s": recompute,
            "tokens": len(tokens)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from services.common.launcher import LocalCluster, with_free_ports
    from services.common.settings import ClusterSettings
    from splitserve.v1 import generation_pb2_grpc

    settings = ClusterSettings()
    settings.model.path = args.model
    settings.model.max_model_len = args.prompt_len + args.max_tokens + 16
    settings.model.max_num_seqs = 1  # one seat: the high request must take it
    with_free_ports(settings)
    tmp = Path(tempfile.mkdtemp(prefix="bench-preemption-"))
    config = tmp / "cluster.yaml"
    settings.dump_yaml(config)
    cluster = LocalCluster(settings, config, tmp).start()
    channel = grpc.insecure_channel(settings.gateway.address)
    try:
        stub = generation_pb2_grpc.GenerationStub(channel)
        _trial(stub, args, seed=-1)  # warm-up
        trials = [_trial(stub, args, seed=i) for i in range(args.trials)]
    finally:
        channel.close()
        cluster.stop()
    assert all(t["tokens"] == args.max_tokens for t in trials), trials
    result = {"trials": trials}
    for key in ("pause_s", "resume_s", "recompute_s"):
        result[f"median_{key}"] = statistics.median(t[key] for t in trials)
    print(f"{args.trials} preemptions after {args.preempt_after} of {args.max_tokens} tokens, "
          f"{args.prompt_len}-token prompts, a {args.high_tokens}-token high-priority answer "
          f"in between: stream pause median {1e3 * result['median_pause_s']:.1f} ms, resume "
          f"{1e3 * result['median_resume_s']:.1f} ms after the seat frees; recomputing the "
          f"paused request instead: median {1e3 * result['median_recompute_s']:.1f} ms to its "
          "next token; every stream completed with all its tokens")
    return result
