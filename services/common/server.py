"""The one server bootstrap: gRPC + health + reflection + the HTTP port + SIGTERM."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import HTTPServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.logging import get_logger
from services.common.observability import Readiness, start_http
from services.common.rpc_guard import GuardInterceptor
from services.common.settings import Endpoint

# A peer that went away is tried again every second at most (gRPC's default backoff
# grows to two minutes), so a restarted worker or store is found again at once.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
    *RECONNECT_OPTIONS,
]


@dataclass
class ServiceHandle:
    name: str
    server: grpc.Server
    port: int
    readiness: Readiness
    health: health.HealthServicer
    service_names: Sequence[str]
    http: HTTPServer | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.readiness.set(ready, reason)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        self.stopping.set()
        self.set_ready(False, "shutting down")
        self.server.stop(grace_s).wait()
        if self.http is not None:
            self.http.shutdown()


def start_server(
    name: str,
    endpoint: Endpoint,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    max_workers: int = 64,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> ServiceHandle:
    """Starts gRPC (NOT_SERVING until ``set_ready``) and the HTTP port of one service.
    ``interceptors`` (e.g. the cluster-secret check) run inside the guard that answers
    malformed bytes INVALID_ARGUMENT and counts every refusal."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS,
                         interceptors=[GuardInterceptor(), *interceptors])
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{endpoint.host}:{endpoint.port}")
    if port == 0:
        raise OSError(f"{name}: cannot listen on {endpoint.address} (port in use?)")
    server.start()
    readiness = Readiness()
    handle = ServiceHandle(name, server, port, readiness, health_servicer, service_names)
    handle.set_ready(False, "starting")
    if endpoint.http_port:
        handle.http = start_http(endpoint.host, endpoint.http_port, readiness)
    get_logger(name).info("listening", grpc_port=port, http_port=endpoint.http_port)
    return handle


def run_until_signal(handle: ServiceHandle, drain: Callable[[], None] | None = None) -> None:
    """Blocks until SIGTERM/SIGINT; then stops taking work, drains, and stops the server."""
    log = get_logger(handle.name)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal", signum=signum)
        handle.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    handle.stopping.wait()
    handle.set_ready(False, "draining")
    if drain is not None:
        drain()
    handle.stop()
    log.info("stopped")


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Polls ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def wait_for_serving(address: str, timeout_s: float, service: str = "") -> bool:
    """Polls a peer's grpc.health.v1 until SERVING or the timeout."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            except grpc.RpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

        return wait_until(serving, timeout_s, poll_s=0.1)
