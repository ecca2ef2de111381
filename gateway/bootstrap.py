"""The gateway process: the ``grpc.aio`` server, its health, readiness and shutdown.

Health (``grpc.health.v1``) and ``/readyz`` say SERVING only while every role the
gateway needs (prefill and decode) has a healthy worker: they follow the worker
poll, back and forth. ``/metrics``, ``/healthz`` and ``/readyz`` are served by
their own HTTP thread, so they answer however busy the event loop is.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.admission import AdmissionController
from gateway.cluster_view import ClusterView
from gateway.flow import FlowDeps
from gateway.kv_index import KVIndex
from gateway.models import gateway_models
from gateway.openai_http import start_openai_front
from gateway.router import Router, make_router
from gateway.server import SERVICE_NAME, GenerationServicer
from gateway.tls import grpc_server_credentials
from gateway.workers import WorkerPool
from services.common.auth import call_metadata
from services.common.logging import get_logger
from services.common.observability import Readiness, start_http
from services.common.server import GRPC_OPTIONS
from services.common.settings import ClusterSettings, GatewaySettings
from splitserve.v1 import kvstore_pb2_grpc

log = get_logger("gateway")
SERVING = health_pb2.HealthCheckResponse.SERVING
# gRPC core cancels (CANCELLED, before any handler runs) calls that arrive while more
# than 1000 wait to be picked up by the server's loop: a burst of a few thousand
# streams hits that. Admission is the gateway's bound, so let them all in.
SERVER_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.server.max_pending_requests", 1 << 16),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 17),
]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GatewayHealth:
    """gRPC health and /readyz, set together. ``degraded`` (the registry unreachable)
    keeps the gateway serving with its last view; it is said in the readiness reason."""

    def __init__(self, servicer: health_async.HealthServicer, readiness: Readiness) -> None:
        self.servicer, self.readiness = servicer, readiness
        self.degraded = ""

    async def set(self, ready: bool, reason: str = "") -> None:
        if ready != self.readiness.ready or reason != self.readiness.reason:
            log.info("readiness", ready=ready, reason=reason)
        self.readiness.set(ready, reason)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, SERVING if ready else NOT_SERVING)

    async def follow(self, pool: WorkerPool) -> None:
        missing = pool.missing_workers()
        reasons = [f"no healthy {' or '.join(missing)} worker"] if missing else []
        await self.set(not missing, "; ".join(reasons + [self.degraded] * bool(self.degraded)))


async def _store_serving(address: str, timeout_s: float) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while loop.time() < end:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if resp.status == SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    return False


async def _wait_for_peers(settings: ClusterSettings, pool: WorkerPool, gh: GatewayHealth,
                          stopping: asyncio.Event) -> None:
    await gh.set(False, "waiting for the kv store")
    if not await _store_serving(settings.kvstore.address, settings.ready_timeout_s):
        raise RuntimeError(f"kv store at {settings.kvstore.address} not reachable")
    await gh.set(False, "waiting for prefill and decode workers")
    await pool.start()
    loop = asyncio.get_running_loop()
    end = loop.time() + settings.ready_timeout_s
    while not pool.all_roles_healthy() and not stopping.is_set():
        if loop.time() >= end:
            raise RuntimeError(f"no healthy {' or '.join(pool.missing_workers())} worker "
                               f"within {settings.ready_timeout_s}s")
        await asyncio.sleep(0.1)


def _start_grpc(settings: ClusterSettings, servicer: GenerationServicer,
                health_servicer: health_async.HealthServicer) -> grpc.aio.Server:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((servicer.handlers(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    gw = settings.gateway
    credentials = grpc_server_credentials(gw)
    port = (server.add_insecure_port(gw.address) if credentials is None
            else server.add_secure_port(gw.address, credentials))
    if port == 0:
        raise OSError(f"gateway: cannot listen on {gw.address} (port in use?)")
    return server


async def serve_async(settings: ClusterSettings) -> None:
    servicer = GenerationServicer(settings, gateway_models(settings))
    health_servicer = health_async.HealthServicer()
    server = _start_grpc(settings, servicer, health_servicer)
    await server.start()
    readiness = Readiness()
    gh = GatewayHealth(health_servicer, readiness)
    await gh.set(False, "starting")
    gw = settings.gateway
    http = start_http(gw.host, gw.http_port, readiness) if gw.http_port else None
    openai = await start_openai_front(gw, servicer) if gw.openai_port else None
    log.info("listening", grpc_port=gw.port, http_port=gw.http_port,
             openai_port=gw.openai_port, tls=bool(gw.tls_cert))

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    metadata = call_metadata(settings)
    pool = WorkerPool(settings, metadata)
    servicer.admission = queue_for(gw)
    index = KVIndex() if settings.redis_url else None
    router = router_for(gw, index)
    view = follow_registry(settings, pool, router, index, gh)
    store_channel = grpc.aio.insecure_channel(settings.kvstore.address, options=GRPC_OPTIONS)
    try:
        await _wait_for_peers(settings, pool, gh, stopping)
        servicer.attach(FlowDeps(pool, router, kvstore_pb2_grpc.KVStoreStub(store_channel),
                                 servicer.metrics, metadata, gw))
        pool.on_change = lambda: loop.create_task(gh.follow(pool))
        await gh.follow(pool)
        await stopping.wait()
        log.info("signal")
        await gh.set(False, "draining")
        await servicer.drain()
    finally:
        pool.on_change = lambda: None
        if openai is not None:
            await openai.close()
        await server.stop(5)
        if http is not None:
            http.shutdown()
        if view is not None:
            await asyncio.to_thread(view.stop)
        await pool.close()
        await store_channel.close()
    log.info("stopped")


def queue_for(gw: GatewaySettings) -> AdmissionController:
    """The admission queue, ordered by ``gateway.queue_policy`` and ``queue_aging_s``."""
    return AdmissionController(gw.max_inflight, gw.max_queue, ordering=gw.queue_policy,
                               aging_s=gw.queue_aging_s)


def router_for(gw: GatewaySettings, index: KVIndex | None) -> Router:
    """The ``gateway.routing`` policy; kv_aware reads the workers' KV events when the
    registry is on."""
    kwargs: dict[str, Any] = {"token_weight": gw.route_token_weight}
    if gw.routing == "kv_aware":
        kwargs["store_block_cost"] = gw.route_store_block_cost
        if index is not None:
            kwargs["prefix_hits"] = lambda w, hashes: index.prefix_blocks(w.worker_id, hashes)
    return make_router(gw.routing, **kwargs)


def follow_registry(settings: ClusterSettings, pool: WorkerPool, router: Router,
                    index: KVIndex | None, gh: GatewayHealth) -> ClusterView | None:
    """With ``redis_url``: workers come and go with the registry, KV events fill
    ``index``, and Redis going away marks the gateway degraded (still serving)."""
    if not settings.redis_url or index is None:
        return None
    loop = asyncio.get_running_loop()

    def removed(worker_id: str) -> None:
        router.forget(worker_id)
        index.forget(worker_id)

    def link(up: bool, reason: str) -> None:
        def apply() -> None:
            gh.degraded = "" if up else reason
            loop.create_task(gh.follow(pool))
        loop.call_soon_threadsafe(apply)

    pool.on_removed = removed
    view = ClusterView(settings.redis_url, settings.registry_namespace, index,
                       lambda members: loop.call_soon_threadsafe(pool.sync, members),
                       on_link=link, grace_s=settings.registry_ttl_s)
    return view.start()


def serve(settings: ClusterSettings, index: int = 0) -> None:
    asyncio.run(serve_async(settings))
