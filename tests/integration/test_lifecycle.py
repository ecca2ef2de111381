"""`splitserve up` brings a cluster up, `splitserve generate` streams, Ctrl-C stops all;
`up` lives and dies with its services: taken ports are refused before anything starts,
and a killed `up` (SIGKILL, or SIGHUP when its terminal closes) leaves no process and
no shared-memory segment behind. Also: the HTTP port bounds its threads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from services.common.launcher import LocalCluster, with_free_ports
from services.common.observability import IDLE_TIMEOUT_S, MAX_HTTP_THREADS, Readiness, start_http
from services.common.server import wait_until
from services.common.settings import ClusterSettings, load_settings
from services.transfer.arena_names import PREFIX, SHM_DIR, remove_arenas_of

UP_TIMEOUT_S = 120


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _shm_segments(pids: list[int]) -> list[str]:
    """The store's arena is /dev/shm/splitserve-kv-<store pid>-<random>."""
    return [n for n in os.listdir(SHM_DIR) if any(n.startswith(f"{PREFIX}{p}-") for p in pids)]


def _config(tmp_path: Path) -> Path:
    settings = with_free_ports(ClusterSettings())
    settings.kvstore.cpu_bytes = 16 << 20
    config = tmp_path / "cluster.yaml"
    settings.dump_yaml(config)
    return config


@contextmanager
def _up(config: Path, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`splitserve up` with its output in a pipe; whatever happens, nothing it started
    outlives the test (its services are SIGKILLed by process group at the end)."""
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", str(config),
                           "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()
    try:
        up.children_seen = seen  # type: ignore[attr-defined]
        yield up
    finally:
        seen.update(_children(up.pid))
        if up.poll() is None:
            up.kill()
        up.wait()
        for pid in seen:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # each service leads its own group
            remove_arenas_of(pid)


def _wait_up(up: subprocess.Popen) -> str:
    lines: list[str] = []
    timer = threading.Timer(UP_TIMEOUT_S, up.kill)
    timer.start()
    try:
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:  # the last line of the banner
                return "".join(lines)
    finally:
        timer.cancel()
    pytest.fail("`up` never came up:\n" + "".join(lines))


@pytest.mark.slow
def test_up_generate_and_ctrl_c(tmp_path: Path) -> None:
    with _up(_config(tmp_path), tmp_path) as up:
        out = _wait_up(up)
        services = _children(up.pid)
        up.children_seen.update(services)
        assert len(services) == 4, out  # store, prefill, decode, gateway
        gateway = next(line.split()[2] for line in out.splitlines() if "gateway-0" in line)
        gen = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "--address", gateway,
             "--max-tokens", "5", "Hello"], capture_output=True, text=True, timeout=60)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip(), "generate printed no text"  # random weights, random text
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        assert wait_until(lambda: not any(_alive(p) for p in services), timeout_s=10), \
            "services left running after Ctrl-C"


def test_up_refuses_taken_ports_and_starts_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    settings = load_settings(config)
    with socket.socket() as squatter:
        squatter.bind((settings.decode[0].host, settings.decode[0].http_port))
        squatter.listen()
        with _up(config, tmp_path) as up:
            out, _ = up.communicate(timeout=60)
            assert up.returncode != 0
            assert f"decode-0 http port 127.0.0.1:{settings.decode[0].http_port}" in out, out
            assert "SplitServe is up" not in out
            assert _children(up.pid) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_killed_up_leaves_no_process_or_shm_segment(tmp_path: Path, signum: int) -> None:
    with _up(_config(tmp_path), tmp_path) as up:
        _wait_up(up)
        services = _children(up.pid)
        up.children_seen.update(services)
        assert len(services) == 4
        assert len(_shm_segments(services)) == 1
        os.kill(up.pid, signum)
        up.wait(timeout=30)
        gone = wait_until(lambda: not any(_alive(p) for p in services), timeout_s=30)
        assert gone, f"services left running after {signal.Signals(signum).name}"
        assert _shm_segments(services) == [], "the store's shm arena was left in /dev/shm"


def test_http_port_bounds_threads_and_drops_idle_connections() -> None:
    server = start_http("127.0.0.1", 0, Readiness(ready=True))
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_HTTP_THREADS + 20)]
    try:
        conn_threads = lambda: sum(t.name == "http-conn" for t in threading.enumerate())  # noqa: E731
        time.sleep(0.5)
        assert conn_threads() <= MAX_HTTP_THREADS
        busy = idle[-1].recv(200)  # beyond the bound: refused at once, not queued
        assert busy.startswith(b"HTTP/1.0 503")
        assert wait_until(lambda: conn_threads() == 0, timeout_s=IDLE_TIMEOUT_S + 3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        for s in idle:
            s.close()
        server.shutdown()


def test_a_store_killed_with_its_group_leaves_no_arena(tmp_path: Path) -> None:
    config = _config(tmp_path)
    cluster = LocalCluster(load_settings(config), config, tmp_path, roles=("kvstore",)).start()
    try:
        pid = cluster.find("kvstore").proc.pid
        assert len(_shm_segments([pid])) == 1
        os.killpg(pid, signal.SIGKILL)  # the store and its resource tracker: nobody unlinks
        cluster.find("kvstore").proc.wait(timeout=10)
    finally:
        cluster.stop()
    assert _shm_segments([pid]) == []
