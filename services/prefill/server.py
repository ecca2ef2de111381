"""PrefillWorker: prompt -> KV blocks in the store + the first token."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc

from services.common.deadline import RequestDeadline
from services.common.logging import get_logger
from services.common.metrics import WorkerMetrics
from services.common.settings import ClusterSettings
from services.common.worker import (
    WorkerContext,
    WorkerServicer,
    check_request,
    fetch_blocks,
    finish_reason,
    grpc_errors,
    sampling_params,
    serve_worker,
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
                yield from self._prefill(ctx, request, deadline)
                handed_over.set()
        finally:
            if not handed_over.is_set():  # a put may have landed after on_rpc_done released
                ctx.store.release_quietly(rid)

    def _prefill(self, ctx: WorkerContext, request: worker_pb2.PrefillRequest,
                 deadline: RequestDeadline) -> Iterator[worker_pb2.PrefillResponse]:
        start = time.perf_counter()
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        check_request(rid, request.model, prompt, ctx.settings.model)
        params = sampling_params(request.sampling)
        bs = ctx.block_size
        hashes = block_hashes(prompt, ctx.hash_ctx, cache_salt=request.cache_salt)
        # The last prompt token is always computed: its logits give the first token.
        usable = hashes[: (len(prompt) - 1) // bs]
        payloads = fetch_blocks(ctx, rid, usable, prefix=True)
        held = len(payloads)
        fetched = time.perf_counter()
        deadline.check()
        stream = ctx.loop.submit(
            rid, prompt, replace(params, max_tokens=1), kv_blocks=payloads or None,
            kv_num_tokens=held * bs, export_kv=True, cache_salt=request.cache_salt,
        )
        first, first_at = None, 0.0
        with deadline.enforced(lambda: ctx.loop.abort(rid)):
            for out in stream:
                if out.finished:  # the first token goes out before the last blocks move
                    first, first_at = self._first_token(out, params, len(prompt), held * bs), \
                        time.perf_counter()
                    yield first
                self._put_blocks(ctx, rid, out)
        refs = [common_pb2.BlockRef(key=h, num_tokens=bs) for h in hashes]
        if len(prompt) % bs:
            refs.append(tail_ref(rid, len(prompt) % bs))
        elapsed = time.perf_counter() - start
        self.metrics.observe_prefill(first.num_computed_tokens, first.num_cached_tokens, elapsed)
        log.info("prefilled", request_id=rid, prompt_tokens=len(prompt),
                 cached_tokens=first.num_cached_tokens, store_blocks=held,
                 fetch_s=round(fetched - start, 5), first_token_s=round(first_at - start, 5),
                 seconds=round(elapsed, 4))
        yield worker_pb2.PrefillResponse(request_id=rid, blocks=refs, kv_num_tokens=len(prompt),
                                         prefill_seconds=elapsed, kv_ready=True)

    @staticmethod
    def _first_token(out: Any, params: Any, prompt_len: int,
                     store_tokens: int) -> worker_pb2.PrefillResponse:
        cached = max(store_tokens, out.num_cached_tokens)
        ended = out.finish_reason == "stop" or params.max_tokens == 1
        return worker_pb2.PrefillResponse(
            request_id=out.request_id,
            first_token_id=out.new_token_ids[0],
            num_cached_tokens=cached,
            num_computed_tokens=prompt_len - cached,
            finish_reason=finish_reason(out.finish_reason if ended else None),
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



def serve(settings: ClusterSettings, index: int) -> None:
    servicer = PrefillServicer(WorkerMetrics("prefill"))
    serve_worker("prefill", servicer, worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                 settings, index)
