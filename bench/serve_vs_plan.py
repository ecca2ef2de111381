"""Measured `bench serve` sweeps against `splitserve plan`'s predictions for the same
deployments, workloads and rates (the planner check of issue 11).

    python3 -m bench.serve_vs_plan --serve-dir OUT/serve --profile OUT/plan/profile.json \\
        --config OUT/colocated.yaml --out OUT/compare

``--serve-dir`` holds ``WORKLOAD/DEPLOYMENT/rate-R/`` folders as ``bench serve --sweep``
writes them (each run's summary.json records its workload options, which are replayed
here); DEPLOYMENT is a folder name mapped to a `plan --predict` spec by ``--deployment
NAME=SPEC`` (default: colocated=1, split=1+1). Each point is predicted three ways:

* ``raw``: the profiled step model alone (no serving overheads);
* ``calibrated``: a step overhead (added to every step) and a hop (added to TTFT) fitted
  at the deployment's lowest measured rate (measured p50 TPOT and TTFT minus the
  prediction's), then used at every rate: the lowest rate agrees in p50 TTFT by
  construction, the other rates test the model;
* ``one_gpu``: calibrated, with every worker of the deployment a process on one GPU (steps
  take turns on the device), which is how the split deployment runs on one card.

Writes compare.json (with the measured goodput share under a grid of SLOs, from
requests.jsonl, to choose objectives after the fact) and goodput_WORKLOAD.png; prints a
table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.plan import parse_deployment
from bench.plan.search import simulate
from bench.plan.simulator import Deployment
from bench.plan.step_model import StepModel
from bench.serve import workload_spec
from bench.serve.metrics import RequestRecord, Slo
from bench.serve.report import pyplot
from bench.serve.workloads import make_workload
from services.common.settings import load_settings

DEFAULT_DEPLOYMENTS = {"colocated": "1", "split": "1+1"}
GRID_TTFT_S = (0.1, 0.2, 0.4, 1.0)
GRID_TPOT_S = (0.005, 0.008, 0.012, 0.02, 0.04)
KEPT = ("rate", "goodput", "goodput_share", "request_throughput")


def load_points(run_dir: Path) -> list[dict[str, Any]]:
    """The summaries of a sweep's rates (also of a sweep cut short), lowest rate first."""
    points = [json.loads(p.read_text()) for p in run_dir.glob("rate-*/summary.json")]
    return sorted(points, key=lambda p: p["rate"])


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: summary[k] for k in KEPT if k in summary}
    for key in ("ttft_s", "tpot_s"):
        out[f"{key[:-2]}_p50_s"] = summary[key]["p50"]
        out[f"{key[:-2]}_p90_s"] = summary[key]["p90"]
    return out


def predict(point: dict[str, Any], deployment: Deployment, model: StepModel,
            overheads: dict[str, float]) -> dict[str, Any]:
    """What `plan --predict` says for the workload, rate and SLO of a measured point."""
    args = argparse.Namespace(**point["workload_args"])
    slo = Slo(**point["slo"])
    sessions = make_workload(workload_spec(args))
    summary = simulate(deployment, model, sessions, point["rate"], slo, arrivals=args.arrivals,
                       burstiness=args.burstiness, seed=args.seed, **overheads)
    return {**brief(summary), "rate": point["rate"]}


def calibrate(point: dict[str, Any], deployment: Deployment,
              model: StepModel) -> dict[str, float]:
    """step_overhead_s, then hop_s, that make the prediction's p50 TPOT and TTFT the
    measured ones at ``point`` (the step overhead first: it lengthens TTFT too)."""
    measured = brief(point)
    raw = predict(point, deployment, model, {})
    step = max(0.0, measured["tpot_p50_s"] - raw["tpot_p50_s"])
    stepped = predict(point, deployment, model, {"step_overhead_s": step})
    return {"hop_s": max(0.0, measured["ttft_p50_s"] - stepped["ttft_p50_s"]),
            "step_overhead_s": step}


def slo_grid(rate_dir: Path) -> list[dict[str, float]]:
    """The goodput share of a run's requests under each SLO of the grid."""
    path = rate_dir / "requests.jsonl"
    if not path.is_file():
        return []
    names = set(RequestRecord.__dataclass_fields__)
    records = [RequestRecord(**{k: v for k, v in json.loads(line).items() if k in names})
               for line in path.read_text().splitlines() if line.strip()]
    return [{"ttft_s": ttft, "tpot_s": tpot,
             "share": sum(r.meets(Slo(ttft, tpot)) for r in records) / max(1, len(records))}
            for ttft in GRID_TTFT_S for tpot in GRID_TPOT_S]


def off(predicted: float, measured: float) -> float | None:
    return None if measured <= 0 else (predicted - measured) / measured


def compare_run(run_dir: Path, spec: str, settings_model: Any,
                model: StepModel) -> dict[str, Any] | None:
    points = load_points(run_dir)
    if not points:
        return None
    deployment = parse_deployment(spec, settings_model)
    shared = parse_deployment(spec, settings_model, one_gpu=True)
    fitted = calibrate(points[0], deployment, model)
    rows = []
    for point in points:
        row = {"measured": brief(point),
               "raw": predict(point, deployment, model, {}),
               "calibrated": predict(point, deployment, model, fitted),
               "one_gpu": predict(point, shared, model, fitted),
               "slo_grid": slo_grid(run_dir / f"rate-{point['rate']:g}")}
        for kind in ("raw", "calibrated", "one_gpu"):
            row[kind]["goodput_off"] = off(row[kind]["goodput"], point["goodput"])
        rows.append(row)
    return {"deployment": spec, "name": deployment.name, "slo": points[0]["slo"],
            "calibration": fitted, "points": rows}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'workload':<15}{'deployment':<11}{'rate':>6}  {'measured':>15}  "
             f"{'raw':>15}  {'calibrated':>15}  {'one GPU':>15}",
             "(goodput req/s (share within the SLO); predictions with their error)"]
    for workload, runs in results.items():
        for name, run in runs.items():
            for row in run["points"]:
                m = row["measured"]
                cells = [f"{m['goodput']:6.2f} ({100 * m['goodput_share']:3.0f}%)"]
                for kind in ("raw", "calibrated", "one_gpu"):
                    err = row[kind]["goodput_off"]
                    said = "  n/a" if err is None else f"{100 * err:+4.0f}%"
                    cells.append(f"{row[kind]['goodput']:6.2f} ({said})")
                lines.append(f"{workload:<15}{name:<11}{m['rate']:>6g}  " + "  ".join(
                    f"{c:>15}" for c in cells))
    return "\n".join(lines)


def plot(out: Path, workload: str, runs: dict[str, dict[str, Any]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        rates = [r["measured"]["rate"] for r in run["points"]]
        ax.plot(rates, [r["measured"]["goodput"] for r in run["points"]], marker="o",
                color=color, label=f"{name}: measured")
        ax.plot(rates, [r["calibrated"]["goodput"] for r in run["points"]], linestyle="--",
                color=color, label=f"{name}: planner (calibrated)")
        if "+" in run["deployment"]:
            ax.plot(rates, [r["one_gpu"]["goodput"] for r in run["points"]], linestyle=":",
                    color=color, label=f"{name}: planner (one GPU)")
    slo = next(iter(runs.values()))["slo"]
    rates = sorted({r["measured"]["rate"] for run in runs.values() for r in run["points"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set(xlabel="offered rate (req/s)", ylabel="goodput (req/s)",
           title=f"{workload}: TTFT <= {1e3 * slo['ttft_s']:g} ms, "
                 f"TPOT <= {1e3 * slo['tpot_s']:g} ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"goodput_{workload}.png", dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    specs = dict(DEFAULT_DEPLOYMENTS)
    specs.update(dict(d.split("=", 1) for d in args.deployment))
    settings_model = load_settings(args.config).model
    model = StepModel.load(Path(args.profile))
    results: dict[str, dict[str, Any]] = {}
    for workload_dir in sorted(p for p in Path(args.serve_dir).iterdir() if p.is_dir()):
        runs = {}
        for name, spec in specs.items():
            if (workload_dir / name).is_dir():
                compared = compare_run(workload_dir / name, spec, settings_model, model)
                if compared is not None:
                    runs[name] = compared
        if runs:
            results[workload_dir.name] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    for workload, runs in results.items():
        plot(out, workload, runs)
    print(table(results))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-dir", required=True, help="WORKLOAD/DEPLOYMENT/rate-R/ folders")
    p.add_argument("--profile", required=True, help="the step model (plan --save-profile)")
    p.add_argument("--config", required=True,
                   help="the cluster YAML measured (its model's batch limits)")
    p.add_argument("--deployment", action="append", default=[], metavar="NAME=SPEC",
                   help="a DEPLOYMENT folder and its --predict spec (N or P+D)")
    p.add_argument("--out", required=True)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
