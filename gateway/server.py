"""The public `splitserve.v1.Generation` service, on ``grpc.aio``.

One event loop serves every stream: a waiting or streaming request costs a task,
not a thread, so admission (``max_inflight`` + ``max_queue``) is the only bound
and everything past it is refused at once. Each request's phases, ticket,
deadline, cancellation and cleanup live in one :class:`RequestLifecycle`.
Requests arrive as raw bytes and are parsed here, so malformed bytes are a
client error (INVALID_ARGUMENT), not an INTERNAL deserializing failure.
Tokenizing runs in a small thread pool (large prompts in their own), never on
the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError, Message

from gateway.admission import AdmissionController, AdmissionRejected
from gateway.flow import FlowDeps, FlowError, RequestFlow, Send
from gateway.identity import Client, ClientIdentifier, effective_cache_salt
from gateway.lifecycle import Phase, RequestLifecycle
from gateway.models import GatewayModel
from gateway.router import NoHealthyWorkerError
from gateway.tokenizer import TokenizerError
from gateway.validation import (
    InputLimits,
    Prechecked,
    RequestError,
    complete,
    precheck,
    tokenize,
)
from services.common.logging import get_logger
from services.common.metrics import GatewayMetrics
from services.common.settings import ClusterSettings
from splitserve.v1 import common_pb2, generation_pb2

log = get_logger("gateway")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
LARGE_PROMPT_BYTES = 64 << 10  # tokenized on a thread of their own: small ones never wait
ABORTED = "aborted by an Abort call"
# A front's own first step: parse the request and identify its client.
Intake = Callable[[], tuple[generation_pb2.GenerateRequest, Client]]


class Refusal(Exception):
    """End the call with ``code``/``message`` (and trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing: tuple[tuple[str, str], ...] = (), param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing
        self.param = param  # the request field at fault, when a front knows it


def parse(cls: type[Message], raw: bytes) -> Message:
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request is not a valid {cls.DESCRIPTOR.full_name} "
                      f"message ({e}); send a serialized {cls.DESCRIPTOR.name}") from e


class GenerationServicer:
    def __init__(self, settings: ClusterSettings, served: Sequence[GatewayModel]) -> None:
        gw = settings.gateway
        self.settings, self.served = settings, list(served)  # the first is the default
        self.admission = AdmissionController(gw.max_inflight, gw.max_queue)
        self.limits = InputLimits(gw.max_prompt_bytes, gw.max_chat_messages)
        self.identifier = ClientIdentifier(gw.api_keys)
        self.deps: FlowDeps | None = None  # set once the peers are reachable
        self.metrics = GatewayMetrics()
        self.metrics.queued.set_function(lambda: self.admission.waiting)
        self.metrics.inflight.set_function(lambda: self.admission.inflight)
        self.accepting = True
        self.active: dict[tuple[str, str], RequestLifecycle] = {}  # (owner, id) ->
        self._small = ThreadPoolExecutor(max(1, gw.tokenizer_threads), "tokenize")
        self._large = ThreadPoolExecutor(1, "tokenize-large")

    def attach(self, deps: FlowDeps) -> None:
        self.deps = deps

    # -- Generate -------------------------------------------------------------------------

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        """The gRPC front: ``Generate``."""
        def intake() -> tuple[generation_pb2.GenerateRequest, Client]:
            return parse(generation_pb2.GenerateRequest, raw), self._client(context)

        try:
            await self.serve(intake, context.write)
        except Refusal as r:
            if r.trailing:
                context.set_trailing_metadata(r.trailing)
            await context.abort(r.code, r.message)

    async def serve(self, intake: Intake, send: Send) -> str:
        """One request from any front: ``intake`` gives the request and its client (or
        raises :class:`Refusal`), ``send`` streams the answers. Returns the outcome ("ok",
        "aborted"); raises :class:`Refusal`, or ``CancelledError`` when the client left."""
        outcome, model = "error", ""
        try:
            req, client = intake()
            deps = self._ready_deps()
            pre = self._precheck(req)
            model = pre.model.name
            outcome = await self._generate(pre, client, deps, send)
            return outcome
        except Refusal as r:
            outcome = r.code.name.lower()
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client went away
            raise
        finally:
            self.metrics.requests.labels(model, outcome).inc()

    def identify(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> Client:
        """The calling client (its key's tenant, or its connection); raises
        :class:`Refusal` UNAUTHENTICATED when keys are required and none matches."""
        try:
            return self.identifier.identify(metadata, peer)
        except RequestError as e:
            raise Refusal(e.code, e.message) from e

    def _client(self, context: grpc.aio.ServicerContext) -> Client:
        return self.identify(context.invocation_metadata() or (), context.peer())

    def _ready_deps(self) -> FlowDeps:
        if self.deps is None or not self.accepting:
            raise Refusal(grpc.StatusCode.UNAVAILABLE,
                          "the gateway is not serving (starting or shutting down)")
        return self.deps

    def _precheck(self, req: generation_pb2.GenerateRequest) -> Prechecked:
        """Every check short of tokenizing; the model is resolved here (NOT_FOUND names
        the served models)."""
        try:
            return precheck(req, self.served, self.limits)
        except RequestError as e:
            raise Refusal(e.code, e.message) from e

    async def _generate(self, pre: Prechecked, client: Client, deps: FlowDeps,
                        send: Send) -> str:
        """Serves one request; returns its outcome ("ok", "aborted"), raises Refusal."""
        req = pre.request
        deadline_s = (req.deadline_ms / 1000 if req.deadline_ms
                      else self.settings.gateway.max_request_s)
        lc = RequestLifecycle(req.request_id, client.owner, deadline_s)
        self._register(lc)
        task = asyncio.current_task()
        lc.on_cancel(task.cancel)
        flow: RequestFlow | None = None
        try:
            ids = await self._admit_and_tokenize(lc, pre)
            vreq = dataclasses.replace(complete(pre, ids), request_id=lc.public_id)
            deps.metrics.prompt_tokens.labels(vreq.model).inc(len(ids))
            await self._wait_for_slot(lc)
            flow = RequestFlow(deps, pre.model, vreq, lc,
                               effective_cache_salt(client, req.cache_salt))
            await flow.run(send)
            return "ok"
        except asyncio.CancelledError:
            if lc.stop is None:  # the client went away: nobody to answer
                log.info("client_gone", request_id=lc.public_id, phase=lc.phase.value,
                         seconds=round(lc.elapsed_s(), 4))
                raise
            task.uncancel()
            log.info("stopped", request_id=lc.public_id, code=lc.stop.code.name,
                     phase=lc.phase.value, reason=lc.stop.message)
            if lc.stop.message != ABORTED:
                raise Refusal(lc.stop.code, lc.stop.message) from None
            # Aborted: the stream ends normally, its last message says FINISH_REASON_ABORT.
            await send(flow.final(common_pb2.FINISH_REASON_ABORT) if flow else
                       generation_pb2.GenerateResponse(
                           request_id=lc.public_id,
                           finish_reason=common_pb2.FINISH_REASON_ABORT))
            return "aborted"
        except RequestError as e:
            raise Refusal(e.code, e.message) from e
        except NoHealthyWorkerError as e:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, str(e)) from e
        except FlowError as e:
            log.warning("failed", request_id=lc.public_id, code=e.code.name, error=str(e))
            raise Refusal(e.code, str(e)) from e
        finally:
            lc.release()
            await lc.wait_released()

    def _register(self, lc: RequestLifecycle) -> None:
        key = (lc.owner, lc.public_id)
        if key in self.active:  # only the same client can collide with itself
            raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                          f"request_id {lc.public_id!r} is already in flight for you; "
                          "use a fresh request_id (or none: the gateway assigns one)")
        self.active[key] = lc
        lc.on_release(lambda: self.active.pop(key, None))

    async def _admit_and_tokenize(self, lc: RequestLifecycle, pre: Prechecked) -> list[int]:
        """Takes a place (refused at once when there is none), then tokenizes off the
        loop (the model's tokenizer is built there at its first use) while the place
        waits for its slot. Token ids of a model whose tokenizer is built are checked on
        the loop: a hop to a thread and back cost more than the check."""
        try:
            ticket = self.admission.try_admit(pre.priority, deadline=lc.remaining_s())
        except AdmissionRejected as e:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message,
                          e.trailing_metadata()) from e
        lc.on_release(lambda: self.admission.release(ticket))
        lc.ticket = ticket
        lc.phase = Phase.QUEUED
        size = pre.request.ByteSize()
        try:
            if pre.request.WhichOneof("input") == "prompt_token_ids" and \
                    size <= LARGE_PROMPT_BYTES and getattr(pre.model, "tokenizer_loaded", False):
                return tokenize(pre)  # ids: a copy and a range check, cheaper than a hop
            pool = self._large if size > LARGE_PROMPT_BYTES else self._small
            return await asyncio.get_running_loop().run_in_executor(pool, tokenize, pre)
        except TokenizerError as e:  # its files changed or broke since the gateway started
            raise Refusal(grpc.StatusCode.INTERNAL,
                          f"model {pre.model.name!r} cannot tokenize: {e}") from e

    async def _wait_for_slot(self, lc: RequestLifecycle) -> None:
        try:
            await self.admission.wait_async(lc.ticket)
        except AdmissionRejected as e:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message,
                          e.trailing_metadata()) from e

    # -- Abort, ListModels ------------------------------------------------------------------

    async def abort(self, raw: bytes,
                    context: grpc.aio.ServicerContext) -> common_pb2.AbortResponse:
        """Stops the caller's own request; an unknown id and another client's id get
        the same answer."""
        try:
            req = parse(common_pb2.AbortRequest, raw)
            client = self._client(context)
        except Refusal as r:
            await context.abort(r.code, r.message)
        lc = self.active.get((client.owner, req.request_id))
        if lc is not None:
            lc.cancel(grpc.StatusCode.CANCELLED, ABORTED)
        return common_pb2.AbortResponse(found=lc is not None)

    async def list_models(self, raw: bytes,
                          context: grpc.aio.ServicerContext
                          ) -> generation_pb2.ListModelsResponse:
        try:
            parse(generation_pb2.ListModelsRequest, raw)
            return self.models()
        except Refusal as r:
            await context.abort(r.code, r.message)

    def models(self) -> generation_pb2.ListModelsResponse:
        """The served models, in config order, with their healthy workers; raises
        :class:`Refusal` UNAVAILABLE while not serving."""
        pool = self._ready_deps().pool
        return generation_pb2.ListModelsResponse(models=[
            generation_pb2.ModelInfo(
                id=m.name, max_model_len=m.max_model_len, block_size=m.block_size,
                prefill_workers=sum(w.healthy for w in pool.workers("prefill", m.name)),
                decode_workers=sum(w.healthy for w in pool.workers("decode", m.name)),
            ) for m in self.served])

    def handlers(self) -> grpc.GenericRpcHandler:
        """The service's methods, taking raw request bytes."""
        ser = {"response_serializer": lambda m: m.SerializeToString()}
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": grpc.unary_stream_rpc_method_handler(self.generate, **ser),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort, **ser),
            "ListModels": grpc.unary_unary_rpc_method_handler(self.list_models, **ser),
        })

    # -- shutdown -----------------------------------------------------------------------

    async def drain(self, grace_s: float = 10.0) -> None:
        """SIGTERM: refuse new requests, let running ones finish, then stop the rest."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        while self.active and loop.time() < end:
            await asyncio.sleep(0.05)
        for lc in list(self.active.values()):
            lc.cancel(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry")
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)


def serve(settings: ClusterSettings, index: int = 0) -> None:
    """`splitserve serve gateway`: runs until SIGTERM."""
    from gateway.bootstrap import serve as run  # the bootstrap imports this module

    run(settings, index)
