"""bench serve: workloads and arrivals are deterministic and have the requested
distributions; goodput is counted as defined."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from bench.serve.arrivals import arrival_times
from bench.serve.metrics import RequestRecord, Slo, parse_slo, summarize
from bench.serve.workloads import (
    SHAREGPT_INPUT_MEAN,
    SHAREGPT_OUTPUT_MEAN,
    WorkloadSpec,
    make_workload,
)


@pytest.mark.parametrize("kind", ["random", "sharegpt-like", "shared-prefix", "multi-turn"])
def test_workloads_are_a_function_of_the_seed(kind: str) -> None:
    a = make_workload(WorkloadSpec(kind=kind, num=20, seed=3))
    b = make_workload(WorkloadSpec(kind=kind, num=20, seed=3))
    c = make_workload(WorkloadSpec(kind=kind, num=20, seed=4))
    assert a == b and a != c


def test_random_lengths_are_uniform_in_their_range() -> None:
    sessions = make_workload(WorkloadSpec(num=2000, input_len=(10, 30), output_len=(5, 9)))
    ins = [len(s.turns[0].new_tokens) for s in sessions]
    outs = [s.turns[0].max_tokens for s in sessions]
    assert (min(ins), max(ins), min(outs), max(outs)) == (10, 30, 5, 9)
    assert abs(statistics.mean(ins) - 20) < 0.5 and abs(statistics.mean(outs) - 7) < 0.2


def test_sharegpt_like_lengths_are_log_normal_with_the_published_means() -> None:
    sessions = make_workload(WorkloadSpec(kind="sharegpt-like", num=4000, max_len=100_000))
    ins = [len(s.turns[0].new_tokens) for s in sessions]
    outs = [s.turns[0].max_tokens for s in sessions]
    assert abs(statistics.mean(ins) / SHAREGPT_INPUT_MEAN - 1) < 0.1
    assert abs(statistics.mean(outs) / SHAREGPT_OUTPUT_MEAN - 1) < 0.1
    logs = [math.log(n) for n in ins]
    assert abs(statistics.stdev(logs) - 1.0) < 0.1  # sigma of the log-normal
    assert statistics.median(ins) < statistics.mean(ins)  # the right tail


def test_shared_prefix_and_multi_turn_prompts() -> None:
    agents = make_workload(WorkloadSpec(kind="shared-prefix", num=8, groups=2, prefix_len=50))
    assert len({tuple(s.prefix) for s in agents}) == 2
    assert all(s.prompt(1, [])[:50] == s.prefix for s in agents)
    chat = make_workload(WorkloadSpec(kind="multi-turn", num=1, turns=2))[0]
    history = chat.turns[0].new_tokens + [7, 7]
    assert chat.prompt(1, history) == history + chat.turns[1].new_tokens


def test_trace_replays_arrivals_and_lengths(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"arrival_s": 0.5, "input_len": 12, "output_len": 3, "prefix_group": "a"},
        {"arrival_s": 1.5, "input_len": 4, "output_len": 9, "prefix_group": "a"},
        {"arrival_s": 2.0, "input_len": 6, "output_len": 1},
    ]))
    sessions = make_workload(WorkloadSpec(kind="trace", trace=str(trace), prefix_len=8))
    assert [s.arrival_s for s in sessions] == [0.5, 1.5, 2.0]
    assert [len(s.turns[0].new_tokens) for s in sessions] == [12, 4, 6]
    assert sessions[0].prefix == sessions[1].prefix and not sessions[2].prefix
    trace.write_text('{"arrival_s": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        make_workload(WorkloadSpec(kind="trace", trace=str(trace)))


@pytest.mark.parametrize(("kind", "cv"), [("poisson", 1.0), ("gamma", 2.0), ("fixed", 0.0)])
def test_arrivals_have_the_rate_and_burstiness(kind: str, cv: float) -> None:
    times = arrival_times(kind, 5000, rate=10.0, burstiness=0.25, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert abs(statistics.mean(gaps) - 0.1) < 0.01
    assert abs(statistics.pstdev(gaps) / statistics.mean(gaps) - cv) < 0.15  # gamma: 1/sqrt(k)
    assert arrival_times("closed", 5, 1.0) is None


def _rec(ttft: float, e2e: float, out: int, ok: bool = True) -> RequestRecord:
    return RequestRecord("s", 0, 0.0, 10, out, 0, ttft, e2e, ok=ok)


def test_goodput_counts_requests_within_both_objectives() -> None:
    slo = parse_slo("ttft=200ms,tpot=50ms")
    assert slo == Slo(0.2, 0.05)
    records = [
        _rec(0.1, 0.1 + 9 * 0.04, 10),  # meets both
        _rec(0.3, 0.3 + 9 * 0.01, 10),  # TTFT too slow
        _rec(0.1, 0.1 + 9 * 0.06, 10),  # TPOT too slow
        _rec(0.2, 0.2, 1),  # one token, TTFT at the limit: meets
        _rec(0.05, 0.1, 3, ok=False),  # failed
    ]
    s = summarize(records, duration_s=2.0, slo=slo)
    assert s["goodput_share"] == 2 / 5 and s["goodput"] == 1.0
    assert s["failed"] == 1 and s["request_throughput"] == 2.0
    with pytest.raises(ValueError, match="ttft=200ms"):
        parse_slo("latency=3")


def test_summary_records_the_workload_it_replays() -> None:
    import argparse

    from bench.serve import add_arguments, workload_args, workload_spec

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input-len", "7,9", "--num", "5", "--seed", "3"])
    recorded = json.loads(json.dumps(workload_args(args)))  # as summary.json keeps it
    assert "address" not in recorded and recorded["num"] == 5
    again = workload_spec(argparse.Namespace(**recorded))
    assert make_workload(again) == make_workload(workload_spec(args))


def test_results_are_written_without_matplotlib(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bench.serve import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    report.pyplot.cache_clear()
    try:
        s = summarize([_rec(0.1, 0.2, 3)], 1.0, Slo())
        report.write_run(tmp_path, {**s, "rate": 1.0}, [_rec(0.1, 0.2, 3)])
        report.write_sweep(tmp_path, [{**s, "rate": 1.0}], 0.9)
    finally:
        report.pyplot.cache_clear()
    assert {p.name for p in tmp_path.iterdir()} == {"summary.json", "requests.jsonl",
                                                     "sweep.json"}
