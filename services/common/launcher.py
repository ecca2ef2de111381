"""Starting services as processes: used by `splitserve up` and the integration tests."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.server import wait_for_serving
from services.common.settings import ClusterSettings, Endpoint
from services.transfer.arena_names import remove_arenas_of

ROLES = ("kvstore", "prefill", "decode", "gateway")
# start order: workers need the store, the gateway its workers; prefill and decode workers
# (each loading a model) start side by side
START_STAGES = (("kvstore",), ("prefill", "decode"), ("gateway",))


@dataclass
class ServiceProcess:
    role: str
    index: int
    endpoint: Endpoint
    proc: subprocess.Popen

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def alive(self) -> bool:
        return self.proc.poll() is None


def role_endpoints(settings: ClusterSettings, role: str) -> list[Endpoint]:
    if role == "kvstore":
        return [settings.kvstore]
    if role == "gateway":
        return [settings.gateway]
    if role == "prefill":
        return settings.prefill
    if role == "decode":
        return settings.decode
    raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "SPLITSERVE_DIE_WITH_PARENT"  # the pid of the launcher a service dies with


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a service a launcher started: get ``signum`` when the launcher dies, however it
    dies (SIGKILL included); exit at once if it already has. Done here, after exec, not
    in a ``preexec_fn``: forking a process that runs gRPC threads can abort the child."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signum)


def spawn(role: str, index: int, config_path: Path, log_dir: Path | None) -> subprocess.Popen:
    """One service in its own process group, which gets SIGTERM when this process dies."""
    cmd = [sys.executable, "-m", "services.cli", "serve", role, "--config", str(config_path)]
    cmd += ["--index", str(index)]
    out = open(log_dir / f"{role}-{index}.log", "ab") if log_dir else subprocess.DEVNULL  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    finally:
        if log_dir:
            out.close()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def taken_ports(settings: ClusterSettings, roles: tuple[str, ...] = ROLES) -> list[str]:
    """Every port of the config that another process holds, said for a person."""
    taken = []
    for role in roles:
        for i, ep in enumerate(role_endpoints(settings, role)):
            ports = [("grpc", ep.port), ("http", ep.http_port)]
            ports.append(("openai", getattr(ep, "openai_port", 0)))  # the gateway's HTTP API
            for kind, port in ports:
                if port and port_in_use(ep.host, port):
                    taken.append(f"{role}-{i} {kind} port {ep.host}:{port}")
    return taken


class PortsTaken(RuntimeError):
    """Ports of the config are held by other processes; nothing was started."""


@dataclass
class LocalCluster:
    """Every service of one config as local processes, started in dependency order."""

    settings: ClusterSettings
    config_path: Path
    log_dir: Path | None = None
    roles: tuple[str, ...] = ROLES
    services: list[ServiceProcess] = field(default_factory=list)
    redis: RedisProcess | None = None  # the local redis-server of redis_url, if started here

    def start(self) -> LocalCluster:
        taken = taken_ports(self.settings, self.roles)
        if taken:
            raise PortsTaken("already in use (another cluster, or a service left running?): "
                             + "; ".join(taken) + ". Stop it or change the ports in the config.")
        try:
            port = local_redis_port(self.settings.redis_url)
            if port is not None:
                self.redis = start_redis(port)
            for stage in START_STAGES:  # the roles of a stage need only earlier stages
                started = [self._start_one(role, i, ep) for role in stage if role in self.roles
                           for i, ep in enumerate(role_endpoints(self.settings, role))]
                for svc in started:
                    self._wait_ready(svc)
        except BaseException:
            self.stop()
            raise
        return self

    def start_service(self, role: str, index: int) -> ServiceProcess:
        """Starts one more service of the config (e.g. a worker joining later) and
        waits until it is SERVING. Call it from a thread that outlives the service: the
        service's parent-death signal fires when the thread that started it exits."""
        svc = self._start_one(role, index, role_endpoints(self.settings, role)[index])
        self._wait_ready(svc)
        return svc

    def _start_one(self, role: str, index: int, endpoint: Endpoint) -> ServiceProcess:
        svc = ServiceProcess(role, index, endpoint, spawn(role, index, self.config_path,
                                                          self.log_dir))
        self.services.append(svc)
        return svc

    def _wait_ready(self, svc: ServiceProcess) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode}"
                                   + self._log_hint(svc))
            if wait_for_serving(svc.endpoint.address, timeout_s=0.5):
                return
        raise TimeoutError(f"{svc.name} not SERVING within {self.settings.ready_timeout_s}s"
                           + self._log_hint(svc))

    def _log_hint(self, svc: ServiceProcess) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{svc.name}.log"
        tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
        return f"; log {path}:\n{tail}"

    def find(self, role: str, index: int = 0) -> ServiceProcess:
        for svc in reversed(self.services):  # the latest start of that service
            if svc.role == role and svc.index == index:
                return svc
        raise KeyError(f"{role}-{index}")

    def kill(self, role: str, index: int = 0) -> None:
        """SIGKILL one service (failure tests)."""
        svc = self.find(role, index)
        svc.proc.kill()
        svc.proc.wait()
        if role == "kvstore":
            remove_arenas_of(svc.proc.pid)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM in reverse start order, SIGKILL what is left after the timeout."""
        for svc in reversed(self.services):
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for svc in reversed(self.services):
            try:
                svc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()
            if svc.role == "kvstore":
                remove_arenas_of(svc.proc.pid)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


LOCAL_REDIS_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class RedisProcess:
    """A ``redis-server`` this process started (no persistence: the registry is soft
    state that members rewrite). Stop it with :meth:`stop`."""

    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(port: int, binary: str = "redis-server", timeout_s: float = 10.0) -> RedisProcess:
    """Starts ``redis-server`` on loopback ``port`` and waits until it answers PING."""
    import redis

    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--protected-mode", "yes"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"redis_url asks for a local Redis but {binary!r} is not "
                           "installed (apt install redis-server)") from e
    rp = RedisProcess(port, proc)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not rp.alive():
            raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
        try:
            if client.ping():
                return rp
        except redis.RedisError:
            time.sleep(0.05)
    rp.stop()
    raise TimeoutError(f"redis-server on port {port} did not answer within {timeout_s}s")


def local_redis_port(redis_url: str | None) -> int | None:
    """The port of a ``redis_url`` on this host that nothing listens on yet (``up``
    then starts redis-server there); None when there is nothing to start."""
    if not redis_url:
        return None
    from urllib.parse import urlparse

    u = urlparse(redis_url)
    if u.scheme != "redis" or u.hostname not in LOCAL_REDIS_HOSTS:
        return None
    port = u.port or 6379
    return port if not port_in_use("127.0.0.1", port) else None


_PORTS_BELOW_EPHEMERAL = (10000, 20000)  # clear of the defaults and the bench scripts'
_handed_out: set[int] = set()
_port_rng = random.Random()  # its own: tests that seed the module's must not repeat ports


def free_port() -> int:
    """A loopback port nothing listens on, for a service to bind soon after. Taken below
    the kernel's ephemeral range where it can: a port from that range (what binding to 0
    gives) may be taken by any outgoing connection before the service binds it."""
    lo, hi = _PORTS_BELOW_EPHEMERAL
    hi = min(hi, _ephemeral_start())
    for _ in range(200 if hi > lo else 0):
        port = _port_rng.randrange(lo, hi)
        if port not in _handed_out and not port_in_use("127.0.0.1", port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # a crowded machine: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def with_free_ports(settings: ClusterSettings) -> ClusterSettings:
    """Gives every endpoint of ``settings`` a fresh loopback port pair (tests, parallel runs)."""
    for role in ROLES:
        for ep in role_endpoints(settings, role):
            ep.port, ep.http_port = free_port(), free_port()
            if getattr(ep, "openai_port", 0):
                ep.openai_port = free_port()
    return settings
