"""DecodeWorker: KV blocks from the store -> the rest of the tokens, streamed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from services.common.deadline import RequestDeadline
from services.common.kv_connector import KVLoad, store_unreachable
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
from services.engine.outputs import merge_outputs
from services.transfer.contract.errors import MissingBlocksError
from splitserve.v1 import worker_pb2, worker_pb2_grpc

log = get_logger("decode")


class DecodeServicer(WorkerServicer, worker_pb2_grpc.DecodeWorkerServicer):
    def Decode(self, request: worker_pb2.DecodeRequest,  # noqa: N802
               context: grpc.ServicerContext) -> Iterator[worker_pb2.DecodeChunk]:
        ctx = self.ready_ctx(context)
        rid = request.request_id

        def on_rpc_done() -> None:  # finish, cancel or failure: free everything
            ctx.loop.abort(rid)
            ctx.store.release_quietly(rid)

        context.add_callback(on_rpc_done)
        with grpc_errors(context):
            deadline = RequestDeadline.of(request.deadline_ms, context)
            try:
                with deadline.store_calls():  # store calls end in time too
                    yield from self._decode(ctx, request, deadline, context.is_active)
            finally:  # a put may have landed after on_rpc_done released: release again
                ctx.kv.release(rid)

    def _decode(self, ctx: WorkerContext, request: worker_pb2.DecodeRequest,
                deadline: RequestDeadline,
                active: Callable[[], bool]) -> Iterator[worker_pb2.DecodeChunk]:
        rid, prompt = request.request_id, ids_list(request.prompt_token_ids)
        check_request(rid, request.model, prompt, ctx.settings.model)
        params = sampling_params(request.sampling)
        # not kept here: the engine lets go of the staging buffer once it is copied in
        load, hashes = self._load(ctx, request)
        self.metrics.observe_kv_load(load.engine_blocks, load.store_blocks)
        deadline.check()
        stream = ctx.loop.submit(
            rid, prompt, params, output_token_ids=ids_list(request.output_token_ids),
            cache_salt=request.cache_salt, export_kv=True, block_hashes=hashes,
            **load.engine_kwargs(),
        )
        n = 0
        prefills = not request.output_token_ids  # colocated: this worker computes the prompt
        saving = True  # until the store is found unreachable: a gap would end the chain
        with deadline.enforced(lambda: ctx.loop.abort(rid)), self._aborted_on_exit(ctx, stream):
            for out in map(merge_outputs, stream.batches()):  # a late reader catches up
                if saving:
                    self.metrics.observe_kv_saved(out, with_tail=False)
                saving = saving and self._save_answer(ctx, rid, out, active)
                chunk = worker_pb2.DecodeChunk(
                    token_ids=out.new_token_ids,
                    finish_reason=finish_reason(out.finish_reason if out.finished else None),
                )
                if prefills and n == 0 and out.new_token_ids:
                    chunk.num_cached_tokens = max(load.num_tokens, out.num_cached_tokens)
                n += len(out.new_token_ids)
                self.metrics.observe_decoded(len(out.new_token_ids))
                yield chunk
        log.info("decoded", request_id=rid, tokens=n, engine_blocks=load.engine_blocks,
                 store_blocks=load.store_blocks)

    @staticmethod
    @contextmanager
    def _aborted_on_exit(ctx: WorkerContext, stream: Any) -> Iterator[None]:
        """However the handler ends (the client gone mid-stream, even before the request
        reached the engine), the engine stops this request: a cancel that came before
        the submit would otherwise leave it running for no one."""
        try:
            yield
        finally:
            ctx.loop.abort(stream.request_id, stream)

    @staticmethod
    def _load(ctx: WorkerContext, request: worker_pb2.DecodeRequest
              ) -> tuple[KVLoad, list[bytes]]:
        """The blocks named by the request; with none named (a resumed request, or a
        colocated cluster's new one), or when they are lost with the store: whatever
        prefix of prompt + outputs the engine and the store hold (the engine computes
        the rest). With the load, the hashes of the leading full blocks (the engine's
        names for them: the named blocks' keys are those hashes)."""
        rid = request.request_id
        if request.blocks:
            keys = [b.key for b in request.blocks]
            full = sum(1 for b in request.blocks if not b.partial)
            try:
                load = ctx.kv.load_exact(rid, keys, full, request.kv_num_tokens)
                return load, keys[:full]
            except grpc.RpcError as e:  # the store went away, or came back without them
                if not (isinstance(e, MissingBlocksError) or store_unreachable(e)):
                    raise
                log.warning("handed_blocks_lost", request_id=rid, error=e.details(),
                            fallback="computing what the store does not hold")
        tokens = ids_list(request.prompt_token_ids) + ids_list(request.output_token_ids)
        hashes = block_hashes(tokens, ctx.hash_ctx, cache_salt=request.cache_salt)
        return ctx.kv.load_prefix(rid, hashes[: (len(tokens) - 1) // ctx.block_size]), hashes

    @staticmethod
    def _save_answer(ctx: WorkerContext, rid: str, out: Any,
                     active: Callable[[], bool]) -> bool:
        """Full blocks go to the store as they fill (the answer's, and the prompt's when
        this worker prefilled), so that the next turn of a conversation, another worker
        after a failure or a preemption finds them there. Best effort: a full or absent
        store costs that reuse, never this answer. False once the store is away."""
        if not active():  # the call is over: its pins were (or are being) released
            return True
        try:
            saved = ctx.kv.save(rid, out, with_tail=False)
            if not active():  # ended while putting: the release may have come first
                ctx.kv.release(rid)
            return saved
        except Exception as e:  # noqa: BLE001 (the stream goes on whatever the store says)
            log.warning("answer_blocks_not_saved", request_id=rid, error=str(e))
            return True


def serve(settings: ClusterSettings, index: int) -> None:
    servicer = DecodeServicer(WorkerMetrics("decode"))
    serve_worker("decode", servicer, worker_pb2_grpc.add_DecodeWorkerServicer_to_server,
                 settings, index)
