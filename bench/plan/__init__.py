"""``splitserve plan``: choose a deployment for a workload and an SLO.

Profiles the engine on this machine (or reads a saved profile), simulates the
workload of `bench serve` against colocated and split deployments of up to
``--gpus`` workers, and prints the one with the most goodput per GPU.
``--predict "1+1" --rate R`` prints the simulated summary of one deployment at
one rate instead (to compare with `bench serve` on the same deployment).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.plan.search import Prediction, candidates, max_rate, simulate
from bench.plan.simulator import Deployment
from bench.plan.step_model import StepModel
from bench.serve import add_workload_arguments, workload_spec
from bench.serve.metrics import parse_slo
from bench.serve.workloads import make_workload
from services.common.settings import ModelSettings, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    e = parser.add_argument_group("engine to profile (the model section of --config; flags "
                                  "given override it)")
    e.add_argument("--config", default=None,
                   help="cluster YAML: its model's engine options (device, dtype, memory, "
                        "batch limits) are profiled and simulated")
    e.add_argument("--model-path", default=None, help="default: dummy:tiny-llama")
    e.add_argument("--device", default=None, help="default: cpu")
    e.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, else float32")
    e.add_argument("--max-num-seqs", type=int, default=None, help="default: 64")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 2048")
    e.add_argument("--max-model-len", type=int, default=None, help="default: 1024")
    e.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GiB")
    e.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while profiling (as many as one worker gets)")
    e.add_argument("--profile", default=None, help="read the step model from this JSON")
    e.add_argument("--save-profile", default=None, help="write the fitted step model here")
    p = parser.add_argument_group("plan")
    p.add_argument("--gpus", type=int, default=2, help="workers (GPUs) to place at most")
    p.add_argument("--hop-ms", type=float, default=0.0,
                   help="serving overhead added to each request's first token (gateway, RPCs)")
    p.add_argument("--handoff-ms", type=float, default=0.0,
                   help="prefill -> decode KV hand-off time of split deployments")
    p.add_argument("--step-overhead-ms", type=float, default=0.0,
                   help="a serving worker's time around each engine step (RPCs, streaming)")
    p.add_argument("--predict", default=None, metavar="N | P+D",
                   help="only simulate this deployment at --rate")
    p.add_argument("--one-gpu", action="store_true",
                   help="--predict: every worker of the deployment is a process on one GPU "
                        "(their steps take turns on it)")
    add_workload_arguments(p)


FLAG_OPTIONS = {"model_path": "path", "device": "device", "dtype": "dtype",
                "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
                "max_model_len": "max_model_len", "kv_cache_gb": "kv_cache_memory_gb"}


def engine_model(args: argparse.Namespace) -> ModelSettings:
    """The model settings to profile and simulate: --config's model section (or the
    defaults below), then the flags given."""
    model = load_settings(args.config).model if args.config else ModelSettings(max_model_len=1024)
    for flag, option in FLAG_OPTIONS.items():
        if getattr(args, flag) is not None:
            setattr(model, option, getattr(args, flag))
    if args.device is not None and args.dtype is None:  # the device's usual dtype
        model.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return model


def _step_model(args: argparse.Namespace, model: ModelSettings) -> StepModel:
    if args.profile:
        return StepModel.load(Path(args.profile))
    from bench.plan.profile import fit_profile, profile_engine
    from services.common.worker import engine_config

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fitted = fit_profile(profile_engine(engine_config(model)))
    if args.save_profile:
        fitted.save(Path(args.save_profile))
    return fitted


def parse_deployment(text: str, model: ModelSettings, one_gpu: bool = False) -> Deployment:
    limits = {"max_num_seqs": model.max_num_seqs,
              "max_num_batched_tokens": model.max_num_batched_tokens, "shared_gpu": one_gpu}
    try:
        if "+" in text:
            p, d = (int(x) for x in text.split("+"))
            return Deployment(prefill=p, decode=d, **limits)
        return Deployment(colocated=int(text), **limits)
    except ValueError as e:
        raise ValueError(f"--predict: expected N (colocated) or P+D, got {text!r}") from e


def run(args: argparse.Namespace) -> dict[str, Any]:
    slo = parse_slo(args.slo)
    engine = engine_model(args)
    model = _step_model(args, engine)
    sessions = make_workload(workload_spec(args))
    extra = {"arrivals": args.arrivals, "burstiness": args.burstiness, "seed": args.seed,
             "hop_s": args.hop_ms / 1e3, "handoff_s": args.handoff_ms / 1e3,
             "step_overhead_s": args.step_overhead_ms / 1e3}
    if args.predict:
        summary = simulate(parse_deployment(args.predict, engine, args.one_gpu), model,
                           sessions, args.rate, slo, **extra)
        print(json.dumps({k: summary[k] for k in ("goodput", "goodput_share",
                                                  "request_throughput", "ttft_s", "tpot_s")},
                         indent=2))
        return summary
    results = [max_rate(d, model, sessions, slo, args.goodput_target, **extra)
               for d in candidates(args.gpus, engine.max_num_seqs,
                                   engine.max_num_batched_tokens)]
    results.sort(key=lambda p: -p.per_gpu)
    print(_table(results, args.goodput_target))
    best = results[0]
    print(f"plan: {best.deployment.name} — {best.goodput:.2f} req/s within the SLO "
          f"({best.per_gpu:.2f} per GPU)")
    return {"best": best.deployment.name, "predictions": [
        {"deployment": p.deployment.name, "gpus": p.deployment.gpus, "max_rate": p.rate,
         "goodput": p.goodput, "goodput_per_gpu": p.per_gpu} for p in results]}


def _table(results: list[Prediction], target: float) -> str:
    lines = [f"{'deployment':<22}{'gpus':>5}{'rate':>10}{'goodput':>10}{'per GPU':>10}",
             f"(highest rate with >= {100 * target:.0f}% of requests within the SLO)"]
    lines += [f"{p.deployment.name:<22}{p.deployment.gpus:>5}{p.rate:>10.2f}{p.goodput:>10.2f}"
              f"{p.per_gpu:>10.2f}" for p in results]
    return "\n".join(lines)
