"""PrefillWorker: prompt -> KV blocks in the store + the first token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc

from services.common.deadline import RequestDeadline
from services.common.kv_connector import tail_ref
from services.common.logging import get_logger
from services.common.metrics import WorkerMetrics
from services.common.proto_ids import ids_list
from services.common.settings import ClusterSettings
from services.common.worker import (
    WorkerContext,
    WorkerServicer,
    check_request,
    finish_reason,
    grpc_errors,
    sampling_params,
    serve_worker,
)
from services.engine.block_hash import block_hashes
from splitserve.v1 import worker_pb2, worker_pb2_grpc

log = get_logger("prefill")


class PrefillServicer(WorkerServicer, worker_pb2_grpc.PrefillWorkerServicer):
    def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802
                context: grpc.ServicerContext) -> Iterator[worker_pb2.PrefillResponse]:
        ctx = self.ready_ctx(context)
        rid = request.request_id
        handed_over = threading.Event()

        def on_rpc_done() -> None:
            if not handed_over.is_set():  # cancelled or failed: nobody will decode it
                ctx.loop.abort(rid)
                ctx.store.release_quietly(rid)

        context.add_callback(on_rpc_done)
        try:
            with grpc_errors(context):
                deadline = RequestDeadline.of(request.deadline_ms, context)
                with deadline.store_calls():  # store calls end in time too
                    yield from self._prefill(ctx, request, deadline)
                handed_over.set()
        finally:
            if not handed_over.is_set():  # a put may have landed after on_rpc_done released
                ctx.store.release_quietly(rid)

    def _prefill(self, ctx: WorkerContext, request: worker_pb2.PrefillRequest,
                 deadline: RequestDeadline) -> Iterator[worker_pb2.PrefillResponse]:
        start = time.perf_counter()
        rid, prompt = request.request_id, ids_list(request.prompt_token_ids)
        check_request(rid, request.model, prompt, ctx.settings.model)
        params = sampling_params(request.sampling)
        bs = ctx.block_size
        hashes = block_hashes(prompt, ctx.hash_ctx, cache_salt=request.cache_salt)
        # The last prompt token is always computed: its logits give the first token.
        load = ctx.kv.load_prefix(rid, hashes[: (len(prompt) - 1) // bs])
        self.metrics.observe_kv_load(load.engine_blocks, load.store_blocks)
        fetched = time.perf_counter()
        deadline.check()
        stream = ctx.loop.submit(
            rid, prompt, replace(params, max_tokens=1), export_kv=True,
            cache_salt=request.cache_salt, block_hashes=hashes, **load.engine_kwargs(),
        )
        first, first_at = None, 0.0
        stored = True  # every block reached the store: they can be handed over
        with deadline.enforced(lambda: ctx.loop.abort(rid)):
            for out in stream:
                if out.finished:  # the first token goes out before the last blocks move
                    first = self._first_token(out, params, len(prompt), load.num_tokens)
                    first_at = time.perf_counter()
                    yield first
                self.metrics.observe_kv_saved(out, with_tail=True)
                stored = stored and ctx.kv.save(rid, out, with_tail=True)
        elapsed = time.perf_counter() - start
        self.metrics.observe_prefill(first.num_computed_tokens, first.num_cached_tokens, elapsed)
        log.info("prefilled", request_id=rid, prompt_tokens=len(prompt),
                 cached_tokens=first.num_cached_tokens, engine_blocks=load.engine_blocks,
                 store_blocks=load.store_blocks,
                 fetch_s=round(fetched - start, 5), first_token_s=round(first_at - start, 5),
                 seconds=round(elapsed, 4))
        yield self._kv_ready(rid, hashes, len(prompt), bs, elapsed, stored)

    @staticmethod
    def _kv_ready(rid: str, hashes: list[bytes], prompt_len: int, bs: int, elapsed: float,
                  stored: bool) -> worker_pb2.PrefillResponse:
        """The hand-over: every prompt block's ref (none when the store is away: the
        decode side then computes). Refs are added in place: building each BlockRef
        first and copying it in costs twice as much on an 8K prompt's 512 blocks."""
        resp = worker_pb2.PrefillResponse(request_id=rid, prefill_seconds=elapsed,
                                          kv_ready=True)
        if not stored:
            return resp
        add = resp.blocks.add
        for h in hashes:
            add(key=h, num_tokens=bs)
        if prompt_len % bs:
            resp.blocks.append(tail_ref(rid, prompt_len % bs))
        resp.kv_num_tokens = prompt_len
        return resp

    @staticmethod
    def _first_token(out: Any, params: Any, prompt_len: int,
                     loaded_tokens: int) -> worker_pb2.PrefillResponse:
        cached = max(loaded_tokens, out.num_cached_tokens)
        ended = out.finish_reason == "stop" or params.max_tokens == 1
        return worker_pb2.PrefillResponse(
            request_id=out.request_id,
            first_token_id=out.new_token_ids[0],
            num_cached_tokens=cached,
            num_computed_tokens=prompt_len - cached,
            finish_reason=finish_reason(out.finish_reason if ended else None),
        )


def serve(settings: ClusterSettings, index: int) -> None:
    servicer = PrefillServicer(WorkerMetrics("prefill"))
    serve_worker("prefill", servicer, worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                 settings, index)
