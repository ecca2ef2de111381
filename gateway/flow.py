"""One request through the split path: prefill worker, then decode worker, streamed.

Yields ``GenerateResponse`` messages. Raises :class:`FlowError` with the gRPC
status to answer when a worker fails; cancellation (the client left, or Abort)
cancels the worker calls, whose servers then free the request's blocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from gateway.detokenizer import TextStream
from gateway.router import DECODE, PREFILL, Router, RouteRequest, WorkerInfo
from gateway.tokenizer import Tokenizer
from gateway.validation import ValidatedRequest
from gateway.workers import WorkerPool
from kvstore.client import KVStoreClient
from services.common.logging import get_logger
from services.common.metrics import GatewayMetrics
from splitserve.v1 import common_pb2, generation_pb2, worker_pb2

log = get_logger("gateway")
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED}


class FlowError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Cancelled(Exception):
    """The client went away or aborted the request."""


class CancelScope:
    """Set once when a request is cancelled; runs the registered cancel hooks then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._hooks: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self._set

    def cancel(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_cancel(self, hook: Callable[[], object]) -> None:
        with self._lock:
            if not self._set:
                self._hooks.append(hook)
                return
        hook()


@dataclass
class FlowDeps:
    pool: WorkerPool
    router: Router
    store: KVStoreClient
    tokenizer: Tokenizer
    metrics: GatewayMetrics
    block_size: int


def _worker_error(phase: str, worker: WorkerInfo, e: grpc.RpcError) -> FlowError:
    code = e.code()
    if code in CLIENT_CODES:
        return FlowError(code, e.details() or code.name)
    return FlowError(grpc.StatusCode.UNAVAILABLE,
                     f"{phase} worker {worker.address} failed: {code.name}: {e.details()}")


class RequestFlow:
    def __init__(self, deps: FlowDeps, req: ValidatedRequest, cancelled: CancelScope,
                 arrival: float) -> None:
        self.deps, self.req, self.cancelled, self.arrival = deps, req, cancelled, arrival
        self.text = TextStream(deps.tokenizer, req.stop, req.prompt_token_ids)
        self.num_output = 0
        self.first_token_at: float | None = None

    def run(self) -> Iterator[generation_pb2.GenerateResponse]:
        try:
            yield from self._run()
        finally:
            self.deps.store.release_quietly(self.req.request_id)  # idempotent; any way out

    def _run(self) -> Iterator[generation_pb2.GenerateResponse]:
        req = self.req
        worker, route = self._route(PREFILL, len(req.prompt_token_ids))
        call = worker_pb2.PrefillRequest(request_id=req.request_id, model=req.model,
                                         prompt_token_ids=req.prompt_token_ids,
                                         sampling=req.sampling_params())
        with self._calling(PREFILL, worker, route):
            stream = self.deps.pool.stub(worker).Prefill(call)
            self.cancelled.on_cancel(stream.cancel)
            first = next(stream)
            yield self._emit([first.first_token_id], ttft=True)
            # Read on to kv_ready even when the request is over: the worker is then done
            # putting blocks, and the release below cannot race with a late put.
            kv = next(m for m in stream if m.kv_ready)
        cached = first.num_cached_tokens
        self.deps.metrics.cached_tokens.inc(cached)
        reason = first.finish_reason
        if self.text.stopped:
            reason = common_pb2.FINISH_REASON_STOP
        if not reason:
            for chunk_resp, chunk_reason in self._decode(first.first_token_id, kv):
                if chunk_resp is not None:
                    yield chunk_resp
                reason = chunk_reason or reason
        yield self._final(reason, cached)

    def _route(self, phase: str, num_tokens: int) -> tuple[WorkerInfo, RouteRequest]:
        route = RouteRequest(request_id=self.req.request_id, model=self.req.model,
                             num_tokens=num_tokens, block_size=self.deps.block_size,
                             priority=self.req.priority, phase=phase)
        worker = self.deps.router.pick(self.deps.pool.workers(phase), route)
        return worker, route

    @contextmanager
    def _calling(self, phase: str, worker: WorkerInfo, route: RouteRequest) -> Iterator[None]:
        """Load bookkeeping around a worker call, and its errors in gateway terms."""
        self.deps.router.on_start(worker, route)
        try:
            yield
        except StopIteration as e:
            raise FlowError(grpc.StatusCode.INTERNAL,
                            f"{phase} worker {worker.address} ended its stream early") from e
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.cancelled.is_set():
                raise Cancelled() from e
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.deps.pool.mark_failed(worker)
            raise _worker_error(phase, worker, e) from e
        finally:
            self.deps.router.on_finish(worker, route)

    def _decode(
        self, first_token: int, kv: worker_pb2.PrefillResponse
    ) -> Iterator[tuple[generation_pb2.GenerateResponse | None, int]]:
        req = self.req
        worker, route = self._route(DECODE, len(req.prompt_token_ids) + req.max_tokens)
        call = worker_pb2.DecodeRequest(
            request_id=req.request_id, model=req.model,
            prompt_token_ids=req.prompt_token_ids, output_token_ids=[first_token],
            sampling=req.sampling_params(), blocks=kv.blocks, kv_num_tokens=kv.kv_num_tokens,
        )
        with self._calling(DECODE, worker, route):
            stream = self.deps.pool.stub(worker).Decode(call)
            self.cancelled.on_cancel(stream.cancel)
            try:
                for chunk in stream:
                    resp = self._emit(list(chunk.token_ids)) if chunk.token_ids else None
                    if self.text.stopped:
                        yield resp, common_pb2.FINISH_REASON_STOP
                        return  # the stream is cancelled below: the worker frees the request
                    yield resp, chunk.finish_reason
            finally:
                stream.cancel()

    def _emit(self, token_ids: list[int], ttft: bool = False) -> generation_pb2.GenerateResponse:
        delta, _ = self.text.push(token_ids)
        self.num_output += len(token_ids)
        resp = generation_pb2.GenerateResponse(request_id=self.req.request_id,
                                               token_ids=token_ids, text=delta)
        if ttft:
            self.first_token_at = time.monotonic()
            resp.ttft_seconds = self.first_token_at - self.arrival
            self.deps.metrics.ttft.observe(resp.ttft_seconds)
        return resp

    def _final(self, reason: int, cached: int) -> generation_pb2.GenerateResponse:
        end = time.monotonic()
        m = self.deps.metrics
        m.e2e.observe(end - self.arrival)
        if self.num_output > 1 and self.first_token_at is not None:
            m.tpot.observe((end - self.first_token_at) / (self.num_output - 1))
        m.output_tokens.inc(self.num_output)
        usage = common_pb2.Usage(prompt_tokens=len(self.req.prompt_token_ids),
                                 completion_tokens=self.num_output, cached_tokens=cached)
        log.info("finished", request_id=self.req.request_id,
                 reason=common_pb2.FinishReason.Name(reason), prompt_tokens=usage.prompt_tokens,
                 completion_tokens=self.num_output, cached_tokens=cached,
                 seconds=round(end - self.arrival, 4))
        return generation_pb2.GenerateResponse(request_id=self.req.request_id,
                                               text=self.text.finish(), finish_reason=reason,
                                               usage=usage)
