"""`splitserve up` brings a cluster up, `splitserve generate` streams, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.launcher import with_free_ports
from services.common.settings import ClusterSettings

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_generate_and_ctrl_c(tmp_path: Path) -> None:
    settings = with_free_ports(ClusterSettings())  # the embedded default, on free ports
    config = tmp_path / "cluster.yaml"
    settings.dump_yaml(config)
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", str(config),
                           "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in up.stdout:
            lines.append(line)
            if "SplitServe is up" in line or time.monotonic() > deadline:
                break
        assert any("SplitServe is up" in x for x in lines), "".join(lines)
        services = _children(up.pid)
        assert len(services) == 4  # store, prefill, decode, gateway
        gen = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "--address",
             settings.gateway.address, "--max-tokens", "5", "Hello"],
            capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in services):
            assert time.monotonic() < deadline, "services left running after Ctrl-C"
            time.sleep(0.1)
    finally:
        if up.poll() is None:
            up.kill()
