"""The OpenAI-compatible HTTP front: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, streamed as server-sent events or whole.

A thin adapter: the JSON body becomes the ``GenerateRequest`` the gRPC front takes
(:mod:`gateway.openai_schema`), the API key the same tenant
(:meth:`GenerationServicer.identify`), and the request runs through the same
:meth:`GenerationServicer.serve` (validation, admission, lifecycle, flow). Its
``GenerateResponse`` messages become OpenAI chunks or one answer
(:mod:`gateway.openai_answer`), its refusals OpenAI errors with the matching HTTP
status (:mod:`gateway.openai_errors`). A stream's headers go out with its first
token, so a request refused by admission or validation still gets its own status
(429, 400...); an error after that is sent as a last ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from gateway.http11 import ClientGone, HttpLimits, HttpRequest, HttpServer, Reply
from gateway.identity import Client
from gateway.openai_answer import Answer
from gateway.openai_errors import OpenAIError, from_status
from gateway.openai_schema import ParsedRequest, SchemaError, parse_chat, parse_completion
from gateway.server import GenerationServicer, Refusal
from gateway.tls import server_ssl_context
from services.common.settings import GatewaySettings
from splitserve.v1 import generation_pb2

SSE_HEADERS = (("cache-control", "no-cache"), ("x-accel-buffering", "no"))
KEY_NEEDED = ("this gateway needs an API key: send the header 'Authorization: Bearer KEY' "
              "(the OpenAI clients' api_key) or 'x-api-key: KEY', with a key from "
              "gateway.api_keys")
Parser = Callable[[bytes], ParsedRequest]


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def error_json(status: int, message: str) -> bytes:
    """An error body for a refusal made before any route runs (413, 408, 503...)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, message, kind).json_bytes()


class OpenAIFront:
    def __init__(self, servicer: GenerationServicer) -> None:
        self.servicer = servicer
        self.created = int(time.time())
        self.routes: dict[str, dict[str, Callable[[HttpRequest, Reply], Any]]] = {
            "/v1/models": {"GET": self._list_models},
            "/v1/completions": {"POST": self._completion(parse_completion)},
            "/v1/chat/completions": {"POST": self._completion(parse_chat)},
        }

    async def handle(self, request: HttpRequest, reply: Reply) -> None:
        try:
            await self._route(request, reply)
        except OpenAIError as e:
            await reply.send(e.status, e.json_bytes(), headers=e.headers)

    async def _route(self, request: HttpRequest, reply: Reply) -> None:
        if request.path.startswith("/v1/models/") and request.method == "GET":
            return await self._get_model(request, reply, request.path[len("/v1/models/"):])
        methods = self.routes.get(request.path.rstrip("/"))
        if methods is None:
            raise OpenAIError(404, f"no route {request.path!r}; this server serves "
                                   f"{', '.join(self.routes)}", code="unknown_url")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(methods)
            raise OpenAIError(405, f"{request.path} takes {allowed}, not {request.method}",
                              code="method_not_allowed", headers=(("allow", allowed),))
        await handler(request, reply)

    # -- models -------------------------------------------------------------------------

    def _identify(self, request: HttpRequest) -> Client:
        try:
            return self.servicer.identify(request.headers, request.peer)
        except Refusal as r:
            raise from_status(r.code, KEY_NEEDED) from r

    def _model_objects(self, request: HttpRequest) -> list[dict[str, Any]]:
        self._identify(request)
        try:
            models = self.servicer.models().models
        except Refusal as r:
            raise from_status(r.code, r.message) from r
        return [{"id": m.id, "object": "model", "created": self.created,
                 "owned_by": "splitserve", "max_model_len": m.max_model_len} for m in models]

    async def _list_models(self, request: HttpRequest, reply: Reply) -> None:
        models = self._model_objects(request)
        await reply.send(200, _json({"object": "list", "data": models}))

    async def _get_model(self, request: HttpRequest, reply: Reply, model_id: str) -> None:
        for m in self._model_objects(request):
            if m["id"] == model_id:
                return await reply.send(200, _json(m))
        raise OpenAIError(404, f"model {model_id!r} is not served here", param="model",
                          code="model_not_found")

    def _completion(self, parse: Parser) -> Callable[[HttpRequest, Reply], Any]:
        return lambda request, reply: Generation(self.servicer, request, reply, parse).run()


class Generation:
    """One ``/v1/completions`` or ``/v1/chat/completions`` request through the servicer."""

    def __init__(self, servicer: GenerationServicer, request: HttpRequest, reply: Reply,
                 parse: Parser) -> None:
        self.servicer, self.request, self.reply, self.parse = servicer, request, reply, parse
        self.chat = parse is parse_chat
        self.parsed: ParsedRequest | None = None
        self.answer: Answer | None = None

    def intake(self) -> tuple[generation_pb2.GenerateRequest, Client]:
        """Inside the servicer (so that refusals here are counted like gRPC's): the
        client first, then the body."""
        try:
            client = self.servicer.identify(self.request.headers, self.request.peer)
        except Refusal as r:
            raise Refusal(r.code, KEY_NEEDED) from r
        try:
            self.parsed = self.parse(self.request.body)
        except SchemaError as e:
            raise Refusal(e.code, e.message, param=e.param) from e
        default = self.servicer.served[0].name  # a request naming none: the only model
        self.answer = Answer(self.parsed, self.parsed.request.model or default)
        return self.parsed.request, client

    async def send(self, msg: generation_pb2.GenerateResponse) -> None:
        chunk = self.answer.add(msg)
        if not self.parsed.stream or chunk is None:
            return
        try:
            await self._start_stream()
            await self.reply.write(_event(chunk))
        except ClientGone:
            raise asyncio.CancelledError from None  # the gRPC front's "client gone", too

    async def _start_stream(self) -> None:
        if not self.reply.started:
            await self.reply.start(200, "text/event-stream", SSE_HEADERS)

    async def run(self) -> None:
        try:
            await self.servicer.serve(self.intake, self.send)
        except Refusal as r:
            error = from_status(r.code, r.message, chat=self.chat, param=r.param,
                                trailing=r.trailing)
            if not self.reply.started:
                raise error from None
            await self._end_stream(error.body())  # the status is sent already
            return
        if not self.parsed.stream:
            await self.reply.send(200, _json(self.answer.complete()))
        else:
            await self._start_stream()
            await self._end_stream(self.answer.usage_chunk())

    async def _end_stream(self, last: dict[str, Any] | None) -> None:
        if last is not None:
            await self.reply.write(_event(last))
        await self.reply.write(b"data: [DONE]\n\n")
        await self.reply.end()


def http_limits(gw: GatewaySettings) -> HttpLimits:
    return HttpLimits(max_connections=gw.openai_max_connections,
                      max_body_bytes=gw.openai_max_body_bytes,
                      header_timeout_s=gw.openai_header_timeout_s,
                      idle_timeout_s=gw.openai_idle_timeout_s)


async def start_openai_front(gw: GatewaySettings, servicer: GenerationServicer) -> HttpServer:
    """The front on ``gw.host:gw.openai_port`` (TLS when ``gw.tls_cert`` is set)."""
    front = OpenAIFront(servicer)
    server = HttpServer(front.handle, http_limits(gw), error_json, server_ssl_context(gw))
    try:
        return await server.start(gw.host, gw.openai_port)
    except OSError as e:
        raise OSError(f"gateway: cannot listen on {gw.host}:{gw.openai_port} for the OpenAI "
                      f"front (gateway.openai_port; in use?): {e}") from e

