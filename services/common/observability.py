"""The HTTP side of every service: /metrics, /healthz, /readyz.

A connection that sends nothing is closed after ``IDLE_TIMEOUT_S``, and at most
``MAX_HTTP_THREADS`` connections are served at once; one more is answered 503 at
once, so idle or slow clients cannot grow the service's threads without bound.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


@dataclass
class Readiness:
    """Whether a service takes work; shared by gRPC health and /readyz."""

    ready: bool = False
    reason: str = "starting"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self.ready, self.reason = ready, reason


IDLE_TIMEOUT_S = 5.0
MAX_HTTP_THREADS = 16
BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
              b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def _handler(readiness: Readiness, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT_S  # socket timeout: an idle or slow client is dropped

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ok, why = readiness.ready, readiness.reason
                # a serving but degraded service says so (e.g. "degraded: redis ...")
                ready = f"ready: {why}\n" if why else "ready\n"
                body = (ready if ok else f"not ready: {why}\n").encode()
                self._reply(200 if ok else 503, body)
            else:
                self._reply(404, b"try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


class BoundedHTTPServer(HTTPServer):
    """One daemon thread per connection, at most ``max_threads`` at once."""

    request_queue_size = 128  # listen backlog: a burst of probes is accepted, then refused

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_threads: int = MAX_HTTP_THREADS) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        threading.Thread(target=self._serve_one, args=(request, client_address),
                         name="http-conn", daemon=True).start()

    def _serve_one(self, request: socket.socket, client_address: object) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 (a broken connection is logged by the base class)
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        try:
            request.settimeout(1.0)
            request.sendall(BUSY_REPLY)
        except OSError:
            pass
        self.shutdown_request(request)


def start_http(
    host: str, port: int, readiness: Readiness, registry: CollectorRegistry = REGISTRY
) -> HTTPServer:
    server = BoundedHTTPServer((host, port), _handler(readiness, registry))
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
