"""The public `splitserve.v1.Generation` service."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from gateway.admission import AdmissionCancelled, AdmissionController, AdmissionRejected
from gateway.flow import Cancelled, CancelScope, FlowDeps, FlowError, RequestFlow
from gateway.router import NoHealthyWorkerError, make_router
from gateway.tokenizer import load_tokenizer
from gateway.validation import RequestError, ServedModel, ValidatedRequest, validate_request
from gateway.workers import WorkerPool
from kvstore.client import KVStoreClient
from services.common.logging import get_logger
from services.common.metrics import GatewayMetrics
from services.common.server import (
    ServiceHandle,
    run_until_signal,
    start_server,
    wait_for_serving,
    wait_until,
)
from services.common.settings import ClusterSettings
from services.engine.config import load_model_config
from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = get_logger("gateway")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def served_model(settings: ClusterSettings) -> ServedModel:
    """The model's limits, read from its config without loading weights."""
    mc = load_model_config(settings.model.path)
    max_len = settings.model.max_model_len or mc.max_position_embeddings
    tokenizer = load_tokenizer(settings.model)
    return ServedModel(settings.model.name, max_len, mc.vocab_size, tokenizer)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, settings: ClusterSettings, model: ServedModel) -> None:
        self.settings, self.model = settings, model
        gw = settings.gateway
        self.admission = AdmissionController(gw.max_inflight, gw.max_queue)
        self.deps: FlowDeps | None = None  # set once the peers are reachable
        self.accepting = True
        self._active: dict[str, CancelScope] = {}
        self._lock = threading.Lock()

    def attach(self, deps: FlowDeps) -> None:
        self.deps = deps

    @property
    def num_active(self) -> int:
        return len(self._active)

    def _ready_deps(self, context: grpc.ServicerContext) -> FlowDeps:
        if self.deps is None or not self.accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the gateway is not serving (starting or shutting down)")
        return self.deps

    def Generate(self, request: generation_pb2.GenerateRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> Iterator[generation_pb2.GenerateResponse]:
        arrival = time.monotonic()
        deps = self._ready_deps(context)
        try:
            req = validate_request(request, [self.model])
        except RequestError as e:
            context.abort(e.code, e.message)
        scope = CancelScope()
        with self._lock:
            if req.request_id in self._active:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"request_id {req.request_id!r} is already being served")
            self._active[req.request_id] = scope
        context.add_callback(scope.cancel)
        deps.metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        outcome = "ok"
        try:
            with self._admitted(req, scope, deps.metrics):
                yield from RequestFlow(deps, req, scope, arrival).run()
        except AdmissionRejected as e:
            outcome = "rejected"
            context.set_trailing_metadata(e.trailing_metadata())
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (AdmissionCancelled, Cancelled):
            outcome = "cancelled"
            log.info("cancelled", request_id=req.request_id)
        except NoHealthyWorkerError as e:
            outcome = "unavailable"
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except FlowError as e:
            outcome = "failed"
            log.warning("failed", request_id=req.request_id, code=e.code.name, error=str(e))
            context.abort(e.code, str(e))
        finally:
            deps.metrics.requests.labels(outcome).inc()
            with self._lock:
                self._active.pop(req.request_id, None)

    @contextmanager
    def _admitted(self, req: ValidatedRequest, scope: CancelScope,
                  metrics: GatewayMetrics) -> Iterator[None]:
        """Waits for an admission slot (gauges kept), holds it for the body."""
        deadline = req.deadline_ms / 1000 if req.deadline_ms else None
        metrics.queued.inc()
        waiting = True
        try:
            with self.admission.slot(req.priority, scope, deadline=deadline):
                metrics.queued.dec()
                waiting = False
                metrics.inflight.inc()
                try:
                    yield
                finally:
                    metrics.inflight.dec()
        finally:
            if waiting:
                metrics.queued.dec()

    def Abort(self, request: common_pb2.AbortRequest,  # noqa: N802
              context: grpc.ServicerContext) -> common_pb2.AbortResponse:
        with self._lock:
            scope = self._active.get(request.request_id)
        if scope is not None:
            scope.cancel()
        return common_pb2.AbortResponse(found=scope is not None)

    def ListModels(self, request: generation_pb2.ListModelsRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> generation_pb2.ListModelsResponse:
        deps = self._ready_deps(context)
        info = generation_pb2.ModelInfo(
            id=self.model.name, max_model_len=self.model.max_model_len,
            block_size=deps.block_size,
            prefill_workers=sum(w.healthy for w in deps.pool.workers("prefill")),
            decode_workers=sum(w.healthy for w in deps.pool.workers("decode")),
        )
        return generation_pb2.ListModelsResponse(models=[info])

    def drain(self, grace_s: float = 10.0) -> None:
        """SIGTERM: refuse new requests, let running ones finish, then cancel the rest."""
        self.accepting = False
        wait_until(lambda: not self.num_active, grace_s)
        with self._lock:
            scopes = list(self._active.values())
        for scope in scopes:
            scope.cancel()


def _wait_for_peers(settings: ClusterSettings, pool: WorkerPool, handle: ServiceHandle) -> None:
    handle.set_ready(False, "waiting for the kv store")
    if not wait_for_serving(settings.kvstore.address, settings.ready_timeout_s):
        raise RuntimeError(f"kv store at {settings.kvstore.address} not reachable")
    handle.set_ready(False, "waiting for prefill and decode workers")
    ready = wait_until(lambda: pool.all_roles_healthy() or handle.stopping.is_set(),
                       settings.ready_timeout_s, poll_s=0.1)
    if not ready or handle.stopping.is_set():
        raise RuntimeError("no healthy prefill and decode workers within "
                           f"{settings.ready_timeout_s}s")


def serve(settings: ClusterSettings, index: int = 0) -> None:
    servicer = GenerationServicer(settings, served_model(settings))
    handle = start_server(
        "gateway", settings.gateway,
        lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server),
        [SERVICE_NAME],
    )
    pool = WorkerPool(settings).start()
    _wait_for_peers(settings, pool, handle)
    store = KVStoreClient(settings.kvstore.address, settings.transfer)
    servicer.attach(FlowDeps(pool, make_router(settings.gateway.routing), store,
                             servicer.model.tokenizer, GatewayMetrics(),
                             settings.model.block_size))
    handle.set_ready(True)
    run_until_signal(handle, drain=servicer.drain)
    pool.close()
    store.close()
