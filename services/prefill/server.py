"""PrefillWorker: prompt -> KV blocks in the store + the first token."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace
from typing import Any

import grpc

from services.common.engine_loop import EngineStopped
from services.common.logging import get_logger
from services.common.metrics import WorkerMetrics
from services.common.server import run_until_signal, start_server
from services.common.settings import ClusterSettings
from services.common.worker import (
    BadRequest,
    WorkerContext,
    WorkerServicer,
    check_request,
    drain,
    endpoint_for,
    finish_reason,
    sampling_params,
    start_worker,
)
from services.engine.block_hash import block_hashes
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = get_logger("prefill")


def tail_key(request_id: str) -> bytes:
    """The private store key of a request's partial last block."""
    return hashlib.blake2b(b"tail|" + request_id.encode(), digest_size=16).digest()


def tail_ref(request_id: str, num_tokens: int) -> common_pb2.BlockRef:
    return common_pb2.BlockRef(key=tail_key(request_id), num_tokens=num_tokens, partial=True)


class PrefillServicer(WorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, metrics: WorkerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802
                context: grpc.ServicerContext) -> worker_pb2.PrefillResponse:
        ctx = self.ready_ctx(context)
        rid = request.request_id
        handed_over = threading.Event()

        def on_rpc_done() -> None:
            if not handed_over.is_set():  # cancelled or failed: nobody will decode it
                ctx.loop.abort(rid)
                ctx.store.release(rid)

        context.add_callback(on_rpc_done)
        try:
            response = self._prefill(ctx, request)
        except BadRequest as e:
            context.abort(e.code, str(e))
        except EngineStopped as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"kv store: {e.details()}")
        handed_over.set()
        return response

    def _prefill(self, ctx: WorkerContext,
                 request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        start = time.perf_counter()
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        check_request(rid, request.model, prompt, ctx.settings.model)
        params = sampling_params(request.sampling)
        bs = ctx.block_size
        hashes = block_hashes(prompt, ctx.hash_ctx)
        # The last prompt token is always computed: its logits give the first token.
        usable = hashes[: (len(prompt) - 1) // bs]
        held = ctx.store.lookup(usable) if usable else 0
        payloads = ctx.store.get(rid, usable[:held]) if held else []
        stream = ctx.loop.submit(
            rid, prompt, replace(params, max_tokens=1),
            kv_blocks=payloads or None, kv_num_tokens=held * bs, export_kv=True,
        )
        first, reason, local_hits = 0, None, 0
        for out in stream:
            self._put_blocks(ctx, rid, out)
            if out.new_token_ids:
                first = out.new_token_ids[0]
            local_hits = max(local_hits, out.num_cached_tokens)
            reason = out.finish_reason
        cached = max(held * bs, local_hits)
        ended = reason == "stop" or params.max_tokens == 1
        refs = [common_pb2.BlockRef(key=h, num_tokens=bs) for h in hashes]
        if len(prompt) % bs:
            refs.append(tail_ref(rid, len(prompt) % bs))
        elapsed = time.perf_counter() - start
        self.metrics.observe_prefill(len(prompt) - cached, cached, elapsed)
        log.info("prefilled", request_id=rid, prompt_tokens=len(prompt), cached_tokens=cached,
                 store_blocks=held, seconds=round(elapsed, 4))
        return worker_pb2.PrefillResponse(
            request_id=rid,
            first_token_id=first,
            blocks=refs,
            kv_num_tokens=len(prompt),
            num_cached_tokens=cached,
            num_computed_tokens=len(prompt) - cached,
            finish_reason=finish_reason(reason if ended else None),
            prefill_seconds=elapsed,
        )

    @staticmethod
    def _put_blocks(ctx: WorkerContext, rid: str, out: Any) -> None:
        """Sends the blocks a step completed to the store while the engine goes on."""
        blocks = list(out.exported_blocks)
        refs = [common_pb2.BlockRef(key=b.block_hash, num_tokens=b.num_tokens) for b in blocks]
        if out.tail_block is not None:
            blocks.append(out.tail_block)
            refs.append(tail_ref(rid, out.tail_block.num_tokens))
        if blocks:
            ctx.store.put(rid, refs, [b.payload for b in blocks], ctx.block_nbytes)

    def Abort(self, request: common_pb2.AbortRequest,  # noqa: N802
              context: grpc.ServicerContext) -> common_pb2.AbortResponse:
        ctx = self.ready_ctx(context)
        ctx.loop.abort(request.request_id)
        ctx.store.release(request.request_id)
        return common_pb2.AbortResponse(found=True)

    def GetLoad(self, request: worker_pb2.LoadRequest,  # noqa: N802
                context: grpc.ServicerContext) -> worker_pb2.WorkerLoad:
        return self.load(context)


SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


def serve(settings: ClusterSettings, index: int) -> None:
    endpoint = endpoint_for(settings, "prefill", index)
    servicer = PrefillServicer(WorkerMetrics("prefill"))
    handle = start_server(
        "prefill", endpoint,
        lambda server: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server),
        [SERVICE_NAME],
    )
    ctx = start_worker("prefill", settings, endpoint, handle)
    servicer.attach(ctx)
    handle.set_ready(True)
    run_until_signal(handle, drain=lambda: drain(ctx))
