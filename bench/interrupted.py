"""What the migration and preemption benchmarks share: a local cluster serving trials of
one long stream that something interrupts after a number of tokens, the stream's
token times, and the cost of recomputing the request instead."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def request(prompt: list[int], max_tokens: int, priority: int = 0) -> Any:
    from splitserve.v1 import common_pb2, generation_pb2

    return generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt), priority=priority,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def timed_stream(stub: Any, req: Any, after: int,
                 interrupt: Callable[[], None]) -> tuple[list[float], list[int]]:
    """Reads ``req``'s stream -> (the time each token came, the tokens). ``interrupt``
    runs on a thread of its own once ``after`` tokens have come, so that the reader
    keeps reading (and timing) meanwhile."""
    times: list[float] = []
    tokens: list[int] = []
    side = threading.Thread(target=interrupt)
    for msg in stub.Generate(req, timeout=120):
        now = time.perf_counter()
        times += [now] * len(msg.token_ids)
        tokens += msg.token_ids
        if len(tokens) >= after and side.ident is None:
            side.start()
    side.join()
    return times, tokens


def longest_gap(times: list[float]) -> float:
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def recompute_s(stub: Any, prompt: list[int], priority: int = 0) -> float:
    """Seconds to the first token of ``prompt`` as a new request: what recomputing an
    interrupted request (prompt + its tokens so far) from scratch costs."""
    start = time.perf_counter()
    list(stub.Generate(request(prompt, 1, priority), timeout=60))
    return time.perf_counter() - start


def run_trials(settings: Any, name: str, trial: Callable[[Any, Any, int], dict[str, float]],
               trials: int) -> list[dict[str, float]]:
    """Starts a local cluster of ``settings`` and runs a warm-up and ``trials`` trials
    (``trial(cluster, stub, seed)``) against its gateway."""
    import grpc

    from services.common.launcher import LocalCluster, with_free_ports
    from splitserve.v1 import generation_pb2_grpc

    with_free_ports(settings)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    config = tmp / "cluster.yaml"
    settings.dump_yaml(config)
    cluster = LocalCluster(settings, config, tmp).start()
    channel = grpc.insecure_channel(settings.gateway.address)
    try:
        stub = generation_pb2_grpc.GenerationStub(channel)
        trial(cluster, stub, -1)  # warm-up
        return [trial(cluster, stub, i) for i in range(trials)]
    finally:
        channel.close()
        cluster.stop()
