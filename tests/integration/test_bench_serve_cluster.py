"""`splitserve bench serve` against a real cluster: every output file, sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import RunningCluster

ROOT = Path(__file__).resolve().parents[2]


def _bench(cluster: RunningCluster, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.cli", "bench", "serve", "--no-tqdm",
           "--address", cluster.settings.gateway.address, "--out", str(out),
           "--max-len", "512", "--input-len", "16,48", "--output-len", "3,6", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_bench_serve_writes_every_output(split_cluster: RunningCluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _bench(split_cluster, out, "--workload", "shared-prefix", "--num", "4",
                  "--turns", "2", "--prefix-len", "64", "--groups", "1",
                  "--arrivals", "closed", "--concurrency", "2")
    assert "goodput" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["requests"], summary["failed"]) == (8, 0)
    assert summary["cached_tokens"] >= 64  # the shared prefix was reused
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x)["ttft_s"] > 0 for x in lines)
    assert (out / "latency_cdf.png").stat().st_size > 0
    assert (out / "latency_over_time.png").stat().st_size > 0


def test_bench_serve_sweep_finds_a_rate(split_cluster: RunningCluster, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    _bench(split_cluster, out, "--num", "6", "--sweep", "rate=4,8", "--slo", "ttft=30s,tpot=5s")
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["rate"] for p in sweep["points"]] == [4.0, 8.0]
    assert sweep["max_rate_meeting_target"] == 8.0  # generous objectives: every rate passes
    assert (out / "goodput_vs_rate.png").stat().st_size > 0
    assert (out / "rate-4" / "summary.json").is_file()
