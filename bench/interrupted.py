"""What the migration and preemption benchmarks share: a local cluster serving trials of
one long stream that something interrupts after a number of tokens, the stream's
token times, and the cost of recomputing the request instead."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_cluster_arguments(g: argparse._ArgumentGroup) -> None:
    """The cluster the trials run on: a cluster YAML (engine options, memory, store size)
    and shortcuts that override its model section."""
    g.add_argument("--config", default=None,
                   help="cluster YAML to start from (default: the embedded one); its model "
                        "section sets the engine (memory, batch limits), kvstore the store")
    g.add_argument("--model", default=None, help="dummy:<shape> or a local HF directory "
                   "(default: the config's, dummy:tiny-llama)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    g.add_argument("--dtype", default=None, help="default: the config's, or bfloat16 with "
                   "--device cuda")
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache of each worker in GiB (set it when several workers share "
                        "one GPU)")
    g.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    g.add_argument("--json", default=None, help="also write the result here")


def base_settings(args: argparse.Namespace) -> Any:
    """--config (or the embedded default) with the shortcuts applied."""
    from services.common.settings import load_settings

    settings = load_settings(args.config)
    model = settings.model
    if args.model:
        model.path = args.model
    if args.device:
        model.device = args.device
        if not args.dtype:
            model.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.dtype:
        model.dtype = args.dtype
    if args.kv_cache_gb is not None:
        model.kv_cache_memory_gb = args.kv_cache_gb
    return settings


def measure(args: argparse.Namespace, name: str, settings: Any,
            trial: Callable[[Any, Any, int], dict[str, float]],
            keys: tuple[str, ...]) -> dict[str, Any]:
    """``args.trials`` trials on a cluster of ``settings`` (room for the prompt and the
    answer); every stream must come back whole. -> the trials, the median of each of
    ``keys``, and what produced them (the options, the engine); written to --json."""
    settings.model.max_model_len = args.prompt_len + args.max_tokens + 16
    model = settings.model
    setup = {**{k: v for k, v in vars(args).items() if k != "func"},
             "engine": {"path": model.path, "device": model.device, "dtype": model.dtype,
                        "max_num_seqs": model.max_num_seqs}}

    def write(trials: list[dict[str, float]], partial: bool = True) -> dict[str, Any]:
        """The result of the trials so far (--json keeps them should the run be cut)."""
        result: dict[str, Any] = {"trials": trials, "partial": partial}
        for key in keys:
            result[f"median_{key}"] = statistics.median(t[key] for t in trials)
        result["setup"] = setup
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result

    trials = run_trials(settings, name, trial, args.trials, args.log_dir, write)
    assert all(t["tokens"] == args.max_tokens for t in trials), trials
    return write(trials, partial=False)


def request(prompt: list[int], max_tokens: int, priority: int = 0, cache_salt: str = "") -> Any:
    from splitserve.v1 import common_pb2, generation_pb2

    return generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(ids=prompt), priority=priority,
        cache_salt=cache_salt,
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


def longest_gap(times: list[float], after: int = 1) -> float:
    """The longest time between two tokens from the ``after``-th token on: the
    interruption's gap, not the prompt's KV hand-off to the first decode worker before
    it (as long as the gap itself where the prompt is long)."""
    tail = times[max(0, after - 1):]
    return max(b - a for a, b in zip(tail, tail[1:], strict=False))


def recompute_s(stub: Any, prompt: list[int], priority: int = 0) -> float:
    """Seconds to the first token of ``prompt`` as a new request: what recomputing an
    interrupted request (prompt + its tokens so far) from scratch costs. A fresh cache
    salt keeps it from finding the interrupted request's KV in the store or the engine."""
    salt = f"recompute-{uuid.uuid4().hex}"
    start = time.perf_counter()
    first = None
    for msg in stub.Generate(request(prompt, 1, priority, salt), timeout=60):
        if msg.token_ids and first is None:  # not the end of the stream: the token
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the recompute request returned no token")
    return first


def run_trials(settings: Any, name: str, trial: Callable[[Any, Any, int], dict[str, float]],
               trials: int, log_dir: str | None = None,
               done: Callable[[list[dict[str, float]]], None] = lambda _: None,
               ) -> list[dict[str, float]]:
    """Starts a local cluster of ``settings`` and runs a warm-up (``seed`` -1) and
    ``trials`` trials (``trial(cluster, stub, seed)``) against its gateway; ``done`` gets
    the trials so far after each one."""
    import grpc

    from services.common.launcher import LocalCluster, with_free_ports
    from splitserve.v1 import generation_pb2_grpc

    with_free_ports(settings)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
        tmp = Path(log_dir) if log_dir else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        config = tmp / "cluster.yaml"
        settings.dump_yaml(config)
        cluster = LocalCluster(settings, config, tmp).start()
        channel = grpc.insecure_channel(settings.gateway.address)
        try:
            stub = generation_pb2_grpc.GenerationStub(channel)
            trial(cluster, stub, -1)  # warm-up
            results: list[dict[str, float]] = []
            for i in range(trials):
                results.append(trial(cluster, stub, i))
                done(results)
            return results
        finally:
            channel.close()
            cluster.stop()
