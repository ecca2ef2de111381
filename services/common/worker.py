"""What prefill and decode workers share: engine set-up, request checks, load reports."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.auth import call_metadata, server_interceptors
from services.common.deadline import DeadlineExceeded
from services.common.engine_loop import EngineLoop, EngineStopped
from services.common.kv_connector import KVConnector
from services.common.logging import get_logger
from services.common.metrics import WorkerMetrics
from services.common.registry import (
    KVEventBuffer,
    Member,
    Registrar,
    advertised_host,
    start_registrar,
)
from services.common.server import (
    ServiceHandle,
    run_until_signal,
    start_server,
    wait_for_serving,
    wait_until,
)
from services.common.settings import ClusterSettings, Endpoint, ModelSettings
from services.engine.block_hash import HashContext
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import common_pb2, worker_pb2


def engine_config(model: ModelSettings) -> Any:
    from services.engine.config import ENGINE_OPTION_NAMES, EngineConfig

    options = {name: getattr(model, name) for name in ENGINE_OPTION_NAMES}
    return EngineConfig(model=model.path, model_id=model.name, **options)


def cpu_threads(settings: ClusterSettings) -> int:
    """Torch threads of one CPU worker: the cores shared among this host's CPU workers
    (several workers each spinning on every core slow all of them down)."""
    if settings.model.cpu_threads:
        return settings.model.cpu_threads
    workers = len(settings.prefill) + len(settings.decode)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def build_engine(settings: ClusterSettings) -> Any:
    import torch

    from services.engine import LLMEngine
    from services.transfer.memory import tune_malloc

    tune_malloc()  # activations and KV payloads reuse heap memory instead of faulting pages
    if settings.model.device == "cpu":
        torch.set_num_threads(cpu_threads(settings))
    return LLMEngine(engine_config(settings.model), use_tqdm=False)


def sampling_params(proto: common_pb2.SamplingParams) -> Any:
    """Engine params from the wire (the gateway has validated the public request)."""
    from services.engine import SamplingParams

    return SamplingParams(
        max_tokens=proto.max_tokens or 16,
        temperature=proto.temperature,
        top_k=proto.top_k if proto.top_k > 0 else -1,
        top_p=proto.top_p or 1.0,
        seed=proto.seed if proto.HasField("seed") else None,
        stop_token_ids=tuple(proto.stop_token_ids),
        ignore_eos=proto.ignore_eos,
    )


FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def finish_reason(name: str | None) -> int:
    return FINISH_REASONS.get(name or "", common_pb2.FINISH_REASON_UNSPECIFIED)


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


STORE_CODES_PASSED_ON = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)


@contextmanager
def grpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Answers a worker RPC's failures with precise statuses instead of a crash."""
    try:
        yield
    except BadRequest as e:
        context.abort(e.code, str(e))
    except DeadlineExceeded as e:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    except EngineStopped as e:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except KeyError as e:  # a block the request names is not in the store
        context.abort(grpc.StatusCode.NOT_FOUND, f"kv store: {e}")
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except grpc.RpcError as e:  # the store's own answer where it is the caller's to act on
        code = e.code() if e.code() in STORE_CODES_PASSED_ON else grpc.StatusCode.UNAVAILABLE
        context.abort(code, f"kv store: {e.details()}")


def check_request(
    request_id: str, model: str, token_ids: Sequence[int], settings: ModelSettings
) -> None:
    """Internal requests come from a gateway, but a worker still refuses nonsense."""
    if not request_id:
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
    if model and model != settings.name:
        raise BadRequest(grpc.StatusCode.NOT_FOUND,
                         f"this worker serves model {settings.name!r}, not {model!r}")
    if not token_ids:
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")


def worker_id(role: str, endpoint: Endpoint) -> str:
    return f"{role}@{socket.gethostname()}:{endpoint.port}/{os.getpid()}"


@dataclass
class WorkerContext:
    """One worker's engine loop, store client and identity."""

    role: str
    settings: ClusterSettings
    endpoint: Endpoint
    loop: EngineLoop
    store: KVStoreClient
    kv: KVConnector
    hash_ctx: HashContext
    block_nbytes: int
    kv_events: KVEventBuffer | None = None  # the prefix cache's KV events (registry on)
    registrar: Registrar | None = None

    @property
    def block_size(self) -> int:
        return self.hash_ctx.block_size

    @property
    def worker_id(self) -> str:
        return worker_id(self.role, self.endpoint)

    def load(self) -> worker_pb2.WorkerLoad:
        st = self.loop.stats
        return worker_pb2.WorkerLoad(
            worker_id=self.worker_id,
            model=self.settings.model.name,
            running=st.num_running,
            waiting=st.num_waiting,
            free_kv_blocks=st.num_free_blocks,
            total_kv_blocks=st.num_kv_blocks,
            max_num_seqs=self.settings.model.max_num_seqs,
        )


def endpoint_for(settings: ClusterSettings, role: str, index: int) -> Endpoint:
    endpoints = settings.prefill if role == "prefill" else settings.decode
    if not 0 <= index < len(endpoints):
        raise ValueError(f"--index {index}: the config has {len(endpoints)} {role} worker(s)")
    return endpoints[index]


def worker_settings(settings: ClusterSettings, endpoint: Endpoint) -> ClusterSettings:
    """The cluster's settings as the worker of ``endpoint`` sees them: ``model`` is the
    model that entry serves (its engine options, its name in loads and the registry)."""
    return dataclasses.replace(settings, model=settings.model_of(endpoint))


def start_worker(role: str, settings: ClusterSettings, endpoint: Endpoint,
                 handle: ServiceHandle) -> WorkerContext:
    """Loads the model, reaches the store; the caller then marks the service ready."""
    log = get_logger(role)
    handle.set_ready(False, "loading model")
    engine = build_engine(settings)
    log.info("model_loaded", model=settings.model.name, kv_blocks=engine.num_kv_blocks,
             block_nbytes=engine.block_nbytes)
    handle.set_ready(False, "waiting for the kv store")
    if not wait_for_serving(settings.kvstore.address, settings.ready_timeout_s):
        raise RuntimeError(f"kv store at {settings.kvstore.address} not reachable")
    store = KVStoreClient(settings.kvstore.address, settings.transfer,
                          metadata=call_metadata(settings))
    log.info("store_connected", address=settings.kvstore.address,
             transport=store.transport_name)
    kv = KVConnector(store, engine.cached_prefix_blocks, engine.block_size,
                     engine.block_nbytes, settings.model.device.startswith("cuda"),
                     prefix_reuse=settings.kvstore.prefix_reuse,
                     forget_store=engine.forget_store)
    engine.kv_cache.export_device = kv.device_payloads
    events = KVEventBuffer() if settings.redis_url else None
    if events is not None:
        engine.block_manager.on_kv_event = events.add
    return WorkerContext(role, settings, endpoint, EngineLoop(engine, role), store, kv,
                         engine.hash_ctx, engine.block_nbytes, events)


def register(ctx: WorkerContext, handle: ServiceHandle) -> Registrar | None:
    """Joins the cluster registry (with ``redis_url``): heartbeat with live load, KV
    events; Redis going away leaves the worker serving, said on /readyz."""
    st, ep = ctx.loop.stats, ctx.endpoint
    member = Member(ctx.role, f"{advertised_host(ep.host)}:{ep.port}", ctx.settings.model.name,
                    ep.http_port, st.num_kv_blocks, ctx.settings.model.max_num_seqs)

    def load() -> dict[str, int]:
        lo = ctx.load()
        return {"running": lo.running, "waiting": lo.waiting, "queued_tokens": lo.queued_tokens,
                "free_kv_blocks": lo.free_kv_blocks}

    def link(up: bool, reason: str) -> None:
        if not handle.stopping.is_set():
            handle.set_ready(True, reason)

    return start_registrar(ctx.settings, member, load, ctx.kv_events, link)


def drain(ctx: WorkerContext, grace_s: float = 10.0) -> None:
    """SIGTERM: take no new work, let running requests finish for a while, abort the rest."""
    if ctx.registrar is not None:  # gateways stop routing here at once
        ctx.registrar.stop()
    ctx.loop.stop_accepting()
    wait_until(lambda: not ctx.loop.num_active, grace_s)
    ctx.loop.stop()
    ctx.store.close()


class WorkerServicer:
    """Base of the worker servicers: refuses work until the model is loaded."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.ctx: WorkerContext | None = None
        self.metrics = metrics

    def attach(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.metrics.watch_engine(lambda: ctx.loop.stats)

    def ready_ctx(self, context: grpc.ServicerContext) -> WorkerContext:
        if self.ctx is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its model")
        return self.ctx

    def Abort(self, request: common_pb2.AbortRequest,  # noqa: N802
              context: grpc.ServicerContext) -> common_pb2.AbortResponse:
        ctx = self.ready_ctx(context)
        ctx.loop.abort(request.request_id)
        ctx.store.release_quietly(request.request_id)
        return common_pb2.AbortResponse(found=True)

    def GetLoad(self, request: worker_pb2.LoadRequest,  # noqa: N802
                context: grpc.ServicerContext) -> worker_pb2.WorkerLoad:
        return self.ready_ctx(context).load()


def serve_worker(role: str, servicer: WorkerServicer,
                 add_servicer: Callable[[Any, grpc.Server], None],
                 settings: ClusterSettings, index: int) -> None:
    """Runs one prefill or decode worker until SIGTERM: health first, then the model."""
    endpoint = endpoint_for(settings, role, index)
    settings = worker_settings(settings, endpoint)
    service = worker_pb2.DESCRIPTOR.services_by_name[f"{role.capitalize()}Worker"].full_name
    handle = start_server(role, endpoint, lambda server: add_servicer(servicer, server),
                          [service], interceptors=server_interceptors(settings))
    ctx = start_worker(role, settings, endpoint, handle)
    servicer.attach(ctx)
    handle.set_ready(True)
    ctx.registrar = register(ctx, handle)
    run_until_signal(handle, drain=lambda: drain(ctx))
