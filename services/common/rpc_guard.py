"""A server interceptor every service installs: malformed request bytes are answered
``INVALID_ARGUMENT`` (gRPC's own answer is ``INTERNAL "Exception deserializing
request!"``), and every call that ends with an error status is counted in
``splitserve_rpc_refused_total{method, code}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter

REFUSED = Counter("splitserve_rpc_refused", "Calls answered with an error status",
                  ["method", "code"])


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 (any parse failure is the caller's bad bytes)
            return _Malformed(e)

    return parse


def _check(request: Any, context: grpc.ServicerContext, method: str) -> Any:
    if isinstance(request, _Malformed):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{method}: the request bytes are not a valid message of this method "
                      f"({type(request.error).__name__}: {request.error}); send the "
                      "serialized request type the .proto names")
    return request


def _checked_stream(requests: Iterator[Any], context: grpc.ServicerContext,
                    method: str) -> Iterator[Any]:
    for request in requests:
        yield _check(request, context, method)


def _count(context: grpc.ServicerContext, method: str, failed: bool) -> None:
    code = context.code()
    if code is None and failed:
        code = grpc.StatusCode.UNKNOWN
    if code is not None and code != grpc.StatusCode.OK:
        REFUSED.labels(method, code.name).inc()


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
    else:
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
    behavior = getattr(handler, kind)

    def request_of(request: Any, context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return _checked_stream(request, context, method)
        return _check(request, context, method)

    def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
        failed = True
        try:
            response = behavior(request_of(request, context), context)
            failed = False
            return response
        finally:
            _count(context, method, failed)

    def streamed_response(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        failed = True
        try:
            yield from behavior(request_of(request, context), context)
            failed = False
        except GeneratorExit:  # the client went away: not a refusal
            failed = False
            raise
        finally:
            _count(context, method, failed)

    wrapped = streamed_response if handler.response_streaming else unary_response
    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer),
                            **{kind: wrapped})


class GuardInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _guarded(handler, handler_call_details.method)
