"""bench/gpu_serving.sh (the GPU serving numbers in one budgeted run) end to end on the CPU
(SMOKE=1: the tiny model, a few requests): every piece succeeds and OUTDIR gets the files
the GPU run tool brings back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BACK = {"gpu_serving.tar.gz", "summary.txt", "compare.json", "goodput_prefill-heavy.png",
        "goodput_decode-heavy.png", "preemption.json", "migration.json"}


def test_smoke_run_of_every_piece(tmp_path: Path) -> None:
    env = {**os.environ, "SMOKE": "1", "BUDGET": "500",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos"),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_serving.sh"), str(tmp_path / "out"),
                           str(tmp_path / "work")], env=env, capture_output=True, text=True,
                          timeout=560)
    assert done.returncode == 0, done.stdout + done.stderr
    status = (tmp_path / "work" / "STATUS").read_text()
    assert status.count("rc=0") == 9 and "up=1 split up=1" in status, done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == BACK
    compare = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert set(compare) == {"prefill-heavy", "decode-heavy"}
    assert all(set(runs) == {"colocated", "split"} for runs in compare.values())
