"""One request through the split path: prefill worker, then decode worker, streamed.

:meth:`RequestFlow.run` sends ``GenerateResponse`` messages through ``send`` and
raises :class:`FlowError` with the gRPC status to answer when a worker fails.
Every worker call carries the request's remaining time as its gRPC timeout and as
``deadline_ms``, the tenant's cache salt, and the cluster secret. Cancellation (the
client left, Abort, the deadline) cancels the serving task; the worker calls are
cancelled with it and their servers free the request's blocks.

A worker that dies (its stream breaks, or its load poll stops answering) does not
end the request: it **migrates**. A prefill that fails before the first token goes
to another prefill worker; after it, and for a decode worker, another decode worker
resumes from the tokens streamed so far: it takes whatever KV the store holds for
them (the prompt's blocks and the answer's blocks saved as they filled) and computes
only the rest, so the client's stream goes on with no token lost or repeated. At
most ``gateway.max_migrations`` times per request; then, or with no worker left,
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field

import grpc

from gateway.detokenizer import TextStream
from gateway.lifecycle import Phase, RequestLifecycle
from gateway.models import GatewayModel
from gateway.preemption import Decoding, Preemptor
from gateway.router import (
    DECODE,
    PREFILL,
    NoHealthyWorkerError,
    Router,
    RouteRequest,
    WorkerInfo,
)
from gateway.sessions import SessionBook, session_owner, tokens_with_kv
from gateway.validation import ValidatedRequest
from gateway.workers import WorkerPool
from services.common.logging import get_logger
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from splitserve.v1 import common_pb2, generation_pb2, kvstore_pb2, kvstore_pb2_grpc, worker_pb2

log = get_logger("gateway")
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
RELEASE_TIMEOUT_S = 5.0  # cleanup outlives the request's deadline, but not by much
LOOKUP_TIMEOUT_S = 0.2  # a slow store answer is not worth delaying the request
WORKER_WAIT_POLL_S = 0.05  # how often a request waiting for a healthy worker looks again

Send = Callable[[generation_pb2.GenerateResponse], Awaitable[None]]


class FlowError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Preempted(Exception):
    """The request's decode call was stopped to give its place to a higher class."""


@dataclass
class FlowDeps:
    pool: WorkerPool
    router: Router
    store: kvstore_pb2_grpc.KVStoreStub  # on the serving loop's channel
    metrics: GatewayMetrics
    metadata: tuple[tuple[str, str], ...] = ()  # the cluster secret
    # its preemption policy, max_migrations and session_ttl_s
    settings: GatewaySettings = field(default_factory=GatewaySettings)
    _preemptors: dict[str, Preemptor] = field(default_factory=dict)  # model ->
    _cleanups: set[asyncio.Task[None]] = field(default_factory=set)
    sessions: SessionBook | None = None  # default: from settings

    def __post_init__(self) -> None:
        if self.sessions is None:
            self.sessions = SessionBook(self.settings.session_max_blocks,
                                        self.settings.session_ttl_s)

    def preemptor(self, model: str) -> Preemptor:
        """The preemptor over ``model``'s decode workers: a request only ever takes
        the place of a request of its own model."""
        if model not in self._preemptors:
            self._preemptors[model] = Preemptor(lambda role: self.pool.workers(role, model),
                                                self.settings.preemption)
        return self._preemptors[model]

    def release_pins(self, owner: str) -> asyncio.Task[None]:
        """Drops the store pins of ``owner`` in a task of its own (a cleanup must not be
        cancelled with the request's task)."""
        task = asyncio.get_running_loop().create_task(self._release(owner))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def store_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading blocks of ``keys`` the store holds (``Lookup``); 0 when it does not
        answer in time (routing then weighs only the workers' own caches)."""
        try:
            resp = await self.store.Lookup(kvstore_pb2.LookupRequest(keys=keys),
                                           metadata=self.metadata, timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.debug("lookup_failed", code=e.code().name, error=e.details())
            return 0
        return resp.num_blocks

    async def pin(self, owner: str, keys: Sequence[bytes]) -> int:
        """Pins the held prefix of ``keys`` in the store for ``owner`` (a session, for
        ``session_ttl_s``) -> blocks pinned; 0 when the store fails (best effort: the
        next turn then recomputes what is missing)."""
        req = kvstore_pb2.PinRequest(owner=owner, keys=keys, ttl_s=self.settings.session_ttl_s)
        try:
            resp = await self.store.Pin(req, metadata=self.metadata, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.warning("pin_failed", owner=owner, code=e.code().name, error=e.details())
            return 0
        return resp.num_blocks

    async def _release(self, owner: str) -> None:
        try:
            await self.store.Release(kvstore_pb2.ReleaseRequest(owner=owner),
                                     metadata=self.metadata, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:  # the store's pin TTL frees them anyway
            log.warning("release_failed", owner=owner, code=e.code().name, error=e.details())


def _worker_error(phase: str, worker: WorkerInfo, e: grpc.RpcError,
                  lifecycle: RequestLifecycle) -> FlowError:
    code = e.code()
    if code in CLIENT_CODES:
        return FlowError(code, e.details() or code.name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and lifecycle.remaining_s() <= 0.05:
        return FlowError(code, f"the request's deadline passed during {phase}")
    return FlowError(grpc.StatusCode.UNAVAILABLE,
                     f"{phase} worker {worker.address} failed: {code.name}: {e.details()}")


class RequestFlow:
    def __init__(self, deps: FlowDeps, model: GatewayModel, req: ValidatedRequest,
                 lifecycle: RequestLifecycle, cache_salt: str = "") -> None:
        self.deps, self.model, self.req, self.lifecycle = deps, model, req, lifecycle
        self.cache_salt = cache_salt
        self.arrival = time.monotonic() - lifecycle.elapsed_s()
        self.text = TextStream(model.tokenizer, req.stop, req.prompt_token_ids)
        self.metrics = deps.metrics.of_model(model.name)
        self.preemptor = deps.preemptor(model.name)
        self.num_output = 0
        self.num_cached = 0
        self.migrations = 0
        self.outputs: list[int] = []  # every token sent
        self.session = (session_owner(cache_salt, req.session_id)
                        if req.session_id and deps.settings.session_ttl_s > 0 else "")
        # named once, when routing weighs where the prompt's KV already is (_kv_view)
        self.block_hashes: tuple[bytes, ...] = ()
        self.store_blocks = 0  # leading blocks of block_hashes the store holds (Lookup)
        self.decoding = Decoding(lifecycle.internal_id, req.priority, self._preempt)
        self._call: grpc.aio.Call | None = None  # the worker call in flight
        self._interrupted: tuple[str, str] | None = None  # (lost | preempted, why)
        self.first: worker_pb2.PrefillResponse | None = None  # the first token's message
        self.first_token_at: float | None = None
        lifecycle.on_release(lambda: deps.release_pins(lifecycle.internal_id))
        if self.session and req.end_session:
            lifecycle.on_release(self._end_session)

    async def run(self, send: Send) -> None:
        if not self.deps.pool.workers(PREFILL, self.model.name):  # colocated: decode prefills
            reason = await self._decode(self.outputs, [], 0, send)
            self.metrics.cached_tokens.inc(self.num_cached)
        else:
            reason = await self._prefill_then_decode(send)
        await self._keep_session()
        await send(self.final(reason))

    async def _prefill_then_decode(self, send: Send) -> int:
        """The split path -> the finish reason."""
        first, kv = await self._prefill(send)
        self.metrics.cached_tokens.inc(self.num_cached)
        self.outputs.append(first.first_token_id)
        if self.text.stopped:
            return common_pb2.FINISH_REASON_STOP
        if first.finish_reason:
            return first.finish_reason
        blocks, kv_tokens = (kv.blocks, kv.kv_num_tokens) if kv else ([], 0)
        return await self._decode(self.outputs, blocks, kv_tokens, send)

    async def _keep_session(self) -> None:
        """The session goes on: this turn's KV stays pinned in the store under it (before
        the last message, so a client's next turn finds it)."""
        if not self.session or self.req.end_session:
            return
        keys = self.model.name_blocks(tokens_with_kv(self.req.prompt_token_ids, self.outputs),
                                      self.cache_salt)
        kept = await self.deps.pin(self.session, keys)
        log.info("session_kept", request_id=self.req.request_id, blocks=kept, of=len(keys))
        for old in self.deps.sessions.kept(self.lifecycle.owner, self.session, kept):
            log.info("session_let_go", session=old, client=self.lifecycle.owner,
                     reason="gateway.session_max_blocks")
            self.deps.release_pins(old)

    def _end_session(self) -> asyncio.Task[None]:
        self.deps.sessions.ended(self.lifecycle.owner, self.session)
        return self.deps.release_pins(self.session)

    async def _prefill(self, send: Send) -> tuple[worker_pb2.PrefillResponse,
                                                  worker_pb2.PrefillResponse | None]:
        """(the first-token message, the kv_ready message or None when the prefill
        worker died after the first token: decode then resumes from the store)."""
        while True:
            try:
                return await self._prefill_on_worker(send)
            except FlowError as e:
                self._migrate_or_raise(e, PREFILL)
                if self.first is not None:  # streamed already: decode takes it from here
                    return self.first, None

    async def _prefill_on_worker(
        self, send: Send,
    ) -> tuple[worker_pb2.PrefillResponse, worker_pb2.PrefillResponse]:
        req, lc = self.req, self.lifecycle
        lc.phase = Phase.PREFILL
        if self._kv_view():  # kv_aware, with a choice: what the store holds
            self.store_blocks = await self.deps.store_prefix(self.block_hashes)
        worker, route = await self._route(PREFILL, len(req.prompt_token_ids))
        call_req = worker_pb2.PrefillRequest(
            request_id=lc.internal_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling_params(), cache_salt=self.cache_salt,
            deadline_ms=lc.remaining_ms())
        call = self.deps.pool.stub(worker).Prefill(
            call_req, timeout=lc.remaining_s(), metadata=self.deps.metadata)
        async with self._calling(PREFILL, worker, route, call):
            try:
                msg = await self._read(call, PREFILL, worker)
                if self.first is None:
                    self.first = msg
                    self.num_cached = msg.num_cached_tokens
                    await send(self._emit([msg.first_token_id], ttft=True))
                # Read on to kv_ready even when the request is over: the worker is then done
                # putting blocks, and the release cannot race with a late put.
                kv = msg
                while not kv.kv_ready:
                    kv = await self._read(call, PREFILL, worker)
                # The worker hands the blocks over only when its stream ends: read to the end.
                while await call.read() is not grpc.aio.EOF:
                    pass
            except BaseException:
                call.cancel()  # the worker then drops the request and its blocks
                raise
        return self.first, kv

    def _kv_view(self) -> bool:
        """Names the prompt's blocks for the router when it weighs where their KV is
        (kv_aware) and there is a choice: with one healthy prefill worker, hashing a
        long prompt and a store Lookup per request would buy nothing. -> whether the
        store still has to be asked."""
        if not self.block_hashes:
            healthy = [w for w in self.deps.pool.workers(PREFILL, self.model.name)
                       if w.healthy]
            if len(healthy) < 2:
                return False
            self.block_hashes = self.deps.router.name_blocks(
                self.model.name_blocks, self.req.prompt_token_ids, self.cache_salt)
        return bool(self.block_hashes) and not self.store_blocks

    def _migrate_or_raise(self, error: FlowError, phase: str) -> None:
        """Carry on elsewhere after a worker failure, or re-raise ``error``."""
        lc = self.lifecycle
        if (error.code != grpc.StatusCode.UNAVAILABLE or lc.stop is not None
                or self.migrations >= self.deps.settings.max_migrations
                or lc.remaining_s() <= 0):
            raise error
        self.migrations += 1
        lc.phase = Phase.MIGRATING
        self.metrics.migrations.inc()
        log.warning("migrating", request_id=self.req.request_id, phase=phase,
                    migration=self.migrations, tokens_so_far=self.num_output, error=str(error))

    @staticmethod
    async def _read(call: grpc.aio.UnaryStreamCall, phase: str, worker: WorkerInfo):
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise FlowError(grpc.StatusCode.UNAVAILABLE,
                            f"{phase} worker {worker.address} ended its stream early")
        return msg

    async def _route(self, phase: str, num_tokens: int) -> tuple[WorkerInfo, RouteRequest]:
        """A worker for ``phase``. When the phase has workers but none is healthy now,
        waits up to ``worker_wait_s`` (within the request's deadline) for one to answer
        its load poll again, rather than refusing at once."""
        route = RouteRequest(request_id=self.lifecycle.internal_id, model=self.req.model,
                             num_tokens=num_tokens, block_size=self.model.block_size,
                             priority=self.req.priority, phase=phase,
                             block_hashes=self.block_hashes if phase == PREFILL else (),
                             store_blocks=self.store_blocks if phase == PREFILL else 0)
        loop = asyncio.get_running_loop()
        end = loop.time() + min(self.deps.settings.worker_wait_s, self.lifecycle.remaining_s())
        while True:
            candidates = self.deps.pool.workers(phase)
            try:
                return self.deps.router.pick(candidates, route), route
            except NoHealthyWorkerError:
                if not candidates or loop.time() >= end:
                    raise
            await asyncio.sleep(WORKER_WAIT_POLL_S)

    def _interrupt(self, kind: str, why: str) -> None:
        """Stops the worker call in flight: its worker died (``lost``) or its place goes
        to a higher class (``preempted``); the flow then moves or pauses the request."""
        if self._call is not None and self._interrupted is None:
            self._interrupted = (kind, why)
            self._call.cancel()

    def _preempt(self) -> None:
        if self.lifecycle.phase == Phase.DECODE:
            self._interrupt("preempted", "preempted for a request of a higher class")

    @asynccontextmanager
    async def _calling(self, phase: str, worker: WorkerInfo, route: RouteRequest,
                       call: grpc.aio.Call) -> AsyncIterator[None]:
        """Load and liveness bookkeeping around a worker call, and its errors in
        gateway terms. A worker found dead by the load poll interrupts the call."""
        self._call, self._interrupted = call, None
        self.deps.router.on_start(worker, route)
        untrack = self.deps.pool.track(worker, lambda why: self._interrupt("lost", why))
        try:
            yield
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            task = asyncio.current_task()
            if self._interrupted is None or (task is not None and task.cancelling()):
                if isinstance(e, asyncio.CancelledError):
                    raise  # the request itself was cancelled
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.deps.pool.mark_failed(worker)
                raise _worker_error(phase, worker, e, self.lifecycle) from e
            kind, why = self._interrupted
            if kind == "preempted":
                raise Preempted(why) from None
            raise FlowError(grpc.StatusCode.UNAVAILABLE, why) from None
        finally:
            self._call = None
            untrack()
            self.deps.router.on_finish(worker, route)

    async def _decode(self, outputs: list[int], blocks: list[common_pb2.BlockRef],
                      kv_tokens: int, send: Send) -> int:
        """Streams the decode worker's tokens (moving to another decode worker if it
        dies, pausing while preempted); returns the finish reason. ``outputs`` grows
        with every token sent."""
        lc = self.lifecycle
        while True:
            try:
                return await self._decode_on_worker(outputs, blocks, kv_tokens, send)
            except Preempted:
                lc.phase = Phase.PREEMPTED
                self.metrics.preemptions.inc()
                log.info("preempted", request_id=self.req.request_id,
                         tokens_so_far=self.num_output)
                await self.preemptor.wait_for_room(self.decoding, lc.remaining_s())
            except FlowError as e:
                self._migrate_or_raise(e, DECODE)
            blocks, kv_tokens = [], 0  # resume: the next worker asks the store itself

    async def _decode_on_worker(self, outputs: list[int], blocks: list[common_pb2.BlockRef],
                                kv_tokens: int, send: Send) -> int:
        req, lc, pre = self.req, self.lifecycle, self.preemptor
        with ExitStack() as asking:
            asking.enter_context(pre.asking(self.decoding))
            pre.make_room(self.decoding)
            worker, route = await self._route(DECODE,
                                              len(req.prompt_token_ids) + req.max_tokens)
            lc.phase = Phase.DECODE
            call_req = worker_pb2.DecodeRequest(
                request_id=lc.internal_id, model=req.model,
                prompt_token_ids=req.prompt_token_ids, output_token_ids=outputs,
                sampling=req.sampling_params(), blocks=blocks, kv_num_tokens=kv_tokens,
                cache_salt=self.cache_salt, deadline_ms=lc.remaining_ms())
            reason = 0
            call = self.deps.pool.stub(worker).Decode(
                call_req, timeout=lc.remaining_s(), metadata=self.deps.metadata)
            async with self._calling(DECODE, worker, route, call):
                with pre.placed(self.decoding, worker):
                    try:
                        async for chunk in call:
                            asking.close()  # placed: paused requests may take a place again
                            self.num_cached = chunk.num_cached_tokens or self.num_cached
                            if chunk.token_ids:
                                resp = self._emit(list(chunk.token_ids),
                                                  ttft=self.first_token_at is None)
                                outputs.extend(resp.token_ids)  # cut at a stop string
                                await send(resp)
                            if self.text.stopped:
                                return common_pb2.FINISH_REASON_STOP  # cancelling frees it
                            reason = chunk.finish_reason or reason
                    finally:
                        call.cancel()
        if not reason:
            raise FlowError(grpc.StatusCode.UNAVAILABLE,
                            f"decode worker {worker.address} ended its stream without "
                            "a finish reason")
        return reason

    def _emit(self, token_ids: list[int], ttft: bool = False) -> generation_pb2.GenerateResponse:
        """The message of new tokens (a chunk of several is cut at a stop string)."""
        delta, token_ids = self.text.push_until_stop(token_ids)
        self.num_output += len(token_ids)
        resp = generation_pb2.GenerateResponse(request_id=self.req.request_id,
                                               token_ids=token_ids, text=delta)
        if ttft:
            self.first_token_at = time.monotonic()
            resp.ttft_seconds = self.first_token_at - self.arrival
            self.metrics.ttft.observe(resp.ttft_seconds)
        return resp

    def final(self, reason: int) -> generation_pb2.GenerateResponse:
        """The last message: finish reason, usage, any text held back."""
        cached = self.num_cached
        end = time.monotonic()
        m = self.metrics
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
