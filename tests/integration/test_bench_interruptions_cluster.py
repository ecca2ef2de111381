"""`splitserve bench preemption` and `bench migration` end to end on the CPU, with the
cluster taken from a YAML (--config): every stream whole, the result written (--json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("kind", "after", "keys"), [
    ("preemption", "--preempt-after", {"median_pause_s", "median_resume_s", "median_recompute_s"}),
    ("migration", "--kill-after", {"median_gap_s", "median_recompute_s"}),
])
def test_bench_runs_on_the_configured_cluster(kind: str, after: str, keys: set[str],
                                              tmp_path: Path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text("model: {path: dummy:tiny-llama, num_kv_blocks: 128, max_num_seqs: 4}\n"
                      "kvstore: {cpu_bytes: 67108864}\nready_timeout_s: 90\n")
    out = tmp_path / f"{kind}.json"
    cmd = [sys.executable, "-m", "services.cli", "bench", kind, "--config", str(config),
           "--trials", "1", "--prompt-len", "64", "--max-tokens", "160", after, "8",
           "--log-dir", str(tmp_path / "logs"), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert keys <= set(result) and [t["tokens"] for t in result["trials"]] == [160]
    assert result["setup"]["engine"]["path"] == "dummy:tiny-llama"
    assert (tmp_path / "logs" / "decode-0.log").is_file()
