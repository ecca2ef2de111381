"""``splitserve bench preemption``: what being preempted costs a stream.

A local cluster (1 prefill worker, 1 decode worker with one seat; the engine and the
store of ``--config``, the tiny model on the CPU by default) serves a long low-priority
stream; after ``--preempt-after`` tokens a short high-priority request arrives and
takes the seat. Reported per trial: the stream's pause (its longest gap between two
tokens from then on), the resume latency (from the
high-priority request's last token to the stream's next one: the seat seen free,
the blocks from the store, the partial last block recomputed), against recomputing
the paused request from scratch (the TTFT of prompt + tokens so far as a new
prompt).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench import interrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("preemption benchmark")
    g.add_argument("--trials", type=int, default=5)
    g.add_argument("--prompt-len", type=int, default=400)
    g.add_argument("--max-tokens", type=int, default=400)
    g.add_argument("--preempt-after", type=int, default=100, help="tokens before the arrival")
    g.add_argument("--high-tokens", type=int, default=16, help="the high request's answer")
    interrupted.add_cluster_arguments(g)


def _trial(stub: Any, args: argparse.Namespace, seed: int) -> dict[str, float]:
    from splitserve.v1 import common_pb2

    rng = random.Random(seed)
    prompt = [rng.randrange(3, 255) for _ in range(args.prompt_len)]
    high_prompt = [rng.randrange(3, 255) for _ in range(32)]
    high_end: list[float] = []

    def high() -> None:
        req = interrupted.request(high_prompt, args.high_tokens,
                                  common_pb2.PRIORITY_CLASS_HIGH)
        for _ in stub.Generate(req, timeout=120):
            pass
        high_end.append(time.perf_counter())

    low = interrupted.request(prompt, args.max_tokens, common_pb2.PRIORITY_CLASS_BATCH)
    times, tokens = interrupted.timed_stream(stub, low, args.preempt_after, high)
    resumed = next((t for t in times if t > high_end[0]), None)
    if resumed is None:
        raise RuntimeError("the stream ended before the high-priority request did: it was "
                           "not preempted (give it more --max-tokens after --preempt-after)")
    recompute = interrupted.recompute_s(stub, prompt + tokens[: args.preempt_after],
                                        common_pb2.PRIORITY_CLASS_HIGH)
    return {"pause_s": interrupted.longest_gap(times, args.preempt_after),
            "resume_s": resumed - high_end[0], "recompute_s": recompute, "tokens": len(tokens)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.common.settings import WorkerEndpoint

    settings = interrupted.base_settings(args)
    settings.model.max_num_seqs = 1  # one seat: the high request must take it
    settings.prefill, settings.decode = [WorkerEndpoint()], [WorkerEndpoint()]
    result = interrupted.measure(args, "preemption", settings,
                                 lambda cluster, stub, seed: _trial(stub, args, seed),
                                 ("pause_s", "resume_s", "recompute_s"))
    print(f"{args.trials} preemptions after {args.preempt_after} of {args.max_tokens} tokens, "
          f"{args.prompt_len}-token prompts, a {args.high_tokens}-token high-priority answer "
          f"in between: stream pause median {1e3 * result['median_pause_s']:.1f} ms, resume "
          f"{1e3 * result['median_resume_s']:.1f} ms after the seat frees; recomputing the "
          f"paused request instead: median {1e3 * result['median_recompute_s']:.1f} ms to its "
          "next token; every stream completed with all its tokens")
    return result
