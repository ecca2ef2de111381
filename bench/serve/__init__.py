"""``splitserve bench serve``: drive a running gateway (gRPC) or any OpenAI-compatible
HTTP endpoint with a workload; report TTFT, TPOT, ITL, end-to-end latency,
throughput and goodput under an SLO, as a table, summary.json, requests.jsonl and
plots. ``--sweep rate=1,2,4`` finds the highest rate whose goodput share stays
above ``--goodput-target``.

    splitserve bench serve --workload sharegpt-like --num 200 --rate 4 --slo ttft=200ms,tpot=50ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.serve.arrivals import arrival_times
from bench.serve.backends import make_backend
from bench.serve.driver import Driver
from bench.serve.metrics import parse_slo, summarize
from bench.serve.report import table, write_run, write_sweep
from bench.serve.workloads import GENERATORS, WorkloadSpec, make_workload


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from e
    if not 0 < pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI, got {text!r}")
    return pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving benchmark")
    g.add_argument("--backend", default="grpc", choices=["grpc", "openai"])
    g.add_argument("--address", default="127.0.0.1:50051",
                   help="gateway host:port (grpc) or base URL such as http://host:8000/v1")
    g.add_argument("--model", default=None, help="default: the first model the endpoint lists")
    g.add_argument("--api-key", default=None)
    add_workload_arguments(g)
    g.add_argument("--concurrency", type=int, default=8, help="clients of a closed loop")
    g.add_argument("--sweep", default=None, metavar="rate=R1,R2,...")
    g.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may take at most (then it counts as failed)")
    g.add_argument("--reuse-cache", action="store_true",
                   help="let runs hit prefixes cached by earlier runs (default: each run "
                        "sends a fresh cache salt, so that a sweep's later rates do not find "
                        "the KV of the earlier rates' identical prompts)")
    g.add_argument("--out", default="bench-serve-out", help="folder for the result files")
    g.add_argument("--no-tqdm", action="store_true")


def add_workload_arguments(g: argparse._ArgumentGroup) -> None:
    """What to send and when, and what counts as good (shared with `splitserve plan`)."""
    g.add_argument("--workload", default="random", choices=sorted(GENERATORS))
    g.add_argument("--num", type=int, default=100, help="sessions (requests if single-turn)")
    g.add_argument("--input-len", type=_pair, default=(64, 512), metavar="LO,HI")
    g.add_argument("--output-len", type=_pair, default=(32, 256), metavar="LO,HI")
    g.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix system prompt")
    g.add_argument("--groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    g.add_argument("--turns", type=int, default=3, help="multi-turn / shared-prefix turns")
    g.add_argument("--max-len", type=int, default=1024, help="prompt + output at most")
    g.add_argument("--token-range", type=_pair, default=(3, 255), metavar="LO,HI")
    g.add_argument("--trace", default=None, help="JSONL trace for --workload trace")
    g.add_argument("--arrivals", default="poisson",
                   choices=["poisson", "gamma", "fixed", "closed"])
    g.add_argument("--rate", type=float, default=4.0, help="sessions per second (open loop)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (< 1: bursty)")
    g.add_argument("--slo", default="ttft=200ms,tpot=50ms")
    g.add_argument("--goodput-target", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    if args.num < 1:
        raise ValueError("--num must be >= 1")
    return WorkloadSpec(
        kind=args.workload, num=args.num, input_len=args.input_len,
        output_len=args.output_len, prefix_len=args.prefix_len, groups=args.groups,
        turns=args.turns, max_len=args.max_len, token_range=args.token_range,
        trace=args.trace, seed=args.seed,
    )


def workload_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``add_workload_arguments`` as given: summary.json records them, so
    that the same workload can be replayed (`splitserve plan`, bench.serve_vs_plan)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_workload_arguments(probe.add_argument_group())
    return {key: getattr(args, key) for key in vars(probe.parse_args([]))}


async def _one_run(args: argparse.Namespace, rate: float, out_dir: Path) -> dict[str, Any]:
    sessions = make_workload(workload_spec(args))
    arrivals = arrival_times(args.arrivals, len(sessions), rate, args.burstiness, args.seed)
    total = sum(len(s.turns) for s in sessions)
    salt = "" if args.reuse_cache else f"bench-serve-{uuid.uuid4().hex[:16]}"
    backend = make_backend(args.backend, args.address, args.model, args.api_key, salt,
                           args.timeout)
    bar = tqdm(total=total, desc=f"bench serve @ {rate:g}/s" if arrivals else "bench serve",
               unit="req", disable=args.no_tqdm)
    try:
        driver = Driver(backend, args.max_len, lambda: bar.update(1), args.seed)
        duration = await driver.run(sessions, arrivals, args.concurrency)
    finally:
        bar.close()
        await backend.close()
    summary = summarize(driver.records, duration, parse_slo(args.slo))
    summary.update(rate=rate, workload=args.workload, arrivals=args.arrivals,
                   sessions_cut_short=driver.cut_short, cache_salt=salt,
                   workload_args={**workload_args(args), "rate": rate})
    write_run(out_dir, summary, driver.records)
    print(table(summary))
    return summary


def _sweep_rates(text: str) -> list[float]:
    key, _, values = text.partition("=")
    if key != "rate" or not values:
        raise ValueError(f"--sweep: expected rate=R1,R2,..., got {text!r}")
    return [float(v) for v in values.split(",")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    parse_slo(args.slo)  # a bad SLO fails before anything is sent
    out = Path(args.out)
    if args.sweep is None:
        result = asyncio.run(_one_run(args, args.rate, out))
    else:
        points = [asyncio.run(_one_run(args, rate, out / f"rate-{rate:g}"))
                  for rate in _sweep_rates(args.sweep)]
        result = write_sweep(out, points, args.goodput_target)
        best = result["max_rate_meeting_target"]
        print(f"highest rate with goodput >= {100 * args.goodput_target:.0f}%: "
              f"{'none' if best is None else f'{best:g} req/s'}")
    print(f"results in {out}/")
    return json.loads(json.dumps(result))  # plain data
