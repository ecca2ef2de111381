"""bench.serve_vs_plan: measured sweeps against the planner's predictions of the same
workload, deployment and rates; the calibration recovers known serving overheads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import serve_vs_plan
from bench.plan.search import simulate
from bench.plan.simulator import Deployment
from bench.plan.step_model import StepModel
from bench.serve import add_arguments, workload_args, workload_spec
from bench.serve.metrics import Slo
from bench.serve.workloads import make_workload

FLAT = StepModel(base=0.010, per_token=0.0, per_attention=0.0, per_seq=0.0, per_context=0.0)
HOP, STEP = 0.005, 0.001  # what the "measured" cluster adds to the engine


def _measure(run_dir: Path, deployment: Deployment, rate: float) -> None:
    """A stand-in for `bench serve`: the simulation with known overheads, written as
    bench serve writes a run."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--num", "40", "--input-len", "32,64", "--output-len", "4,8",
                              "--slo", "ttft=30ms,tpot=12ms", "--seed", "5"])
    sessions = make_workload(workload_spec(args))
    summary = simulate(deployment, FLAT, sessions, rate, Slo(0.03, 0.012), seed=5, hop_s=HOP,
                       step_overhead_s=STEP)
    out = run_dir / f"rate-{rate:g}"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(
        {**summary, "rate": rate, "workload_args": {**workload_args(args), "rate": rate}}))
    (out / "requests.jsonl").write_text(json.dumps(
        {"session_id": "s0", "turn": 0, "sent_s": 0.0, "prompt_tokens": 40, "output_tokens": 5,
         "cached_tokens": 0, "ttft_s": 0.02, "e2e_s": 0.06, "itl_s": [], "tpot_s": 0.01}) + "\n")


def test_predictions_of_the_measured_runs(tmp_path: Path) -> None:
    serve = tmp_path / "serve"
    for rate in (2.0, 8.0, 50.0):
        _measure(serve / "wl" / "colocated", Deployment(colocated=1), rate)
        _measure(serve / "wl" / "split", Deployment(prefill=1, decode=1), rate)
    FLAT.save(tmp_path / "profile.json")
    (tmp_path / "c.yaml").write_text("model: {max_num_seqs: 64, max_num_batched_tokens: 2048}\n")
    results = serve_vs_plan.run(argparse.Namespace(
        serve_dir=str(serve), profile=str(tmp_path / "profile.json"),
        config=str(tmp_path / "c.yaml"), deployment=[], out=str(tmp_path / "cmp")))
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == results
    for name in ("colocated", "split"):
        run = results["wl"][name]
        assert run["calibration"] == pytest.approx({"hop_s": HOP, "step_overhead_s": STEP})
        assert [r["measured"]["rate"] for r in run["points"]] == [2.0, 8.0, 50.0]
        for row in run["points"]:  # the same simulation: calibrated is exact at every rate
            assert row["calibrated"]["goodput_off"] == pytest.approx(0.0, abs=1e-9)
            assert row["raw"]["ttft_p50_s"] < row["measured"]["ttft_p50_s"]
        grid = run["points"][0]["slo_grid"]  # of requests.jsonl's one request: TPOT 10 ms
        assert [g["share"] for g in grid if g["ttft_s"] == 0.1] == [0, 0, 1, 1, 1]
    assert (tmp_path / "cmp" / "goodput_wl.png").stat().st_size > 0
