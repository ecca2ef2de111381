"""Internal trust: a cluster secret in gRPC metadata between cluster members.

Stores and workers refuse calls that lack the secret (``UNAUTHENTICATED``);
gateways, workers and stores send it on every internal call with
``call_metadata(settings)``. Health and reflection stay open so that probes and
``grpcurl`` keep working. With no secret configured everything is open.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.common.logging import get_logger
from services.common.settings import ClusterSettings

SECRET_ENV = "SPLITSERVE_CLUSTER_SECRET"
SECRET_METADATA_KEY = "x-splitserve-secret"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def cluster_secret(settings: ClusterSettings) -> str | None:
    """The secret of this cluster: a non-empty environment value overrides the config."""
    return os.environ.get(SECRET_ENV) or settings.cluster_secret or None


def call_metadata(settings: ClusterSettings) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that proves cluster membership on an internal call."""
    secret = cluster_secret(settings)
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


def secret_metadata_from_env() -> tuple[tuple[str, str], ...]:
    """``call_metadata`` for a process that has no settings at hand: the env's secret."""
    secret = os.environ.get(SECRET_ENV)
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to every call of a channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_metadata(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_metadata(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_metadata(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_metadata(details), requests)


def with_metadata(channel: grpc.Channel, metadata: Sequence[tuple[str, str]]) -> grpc.Channel:
    """``channel`` sending ``metadata`` (e.g. ``call_metadata(settings)``) on every call."""
    if not metadata:
        return channel
    return grpc.intercept_channel(channel, _MetadataInterceptor(metadata))


def _refusal_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that only refuses."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"missing or wrong cluster secret: internal calls must carry "
                      f"'{SECRET_METADATA_KEY}' metadata ({SECRET_ENV} of the cluster)")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=None, response_serializer=None)


class SecretInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health/reflection that lacks the cluster secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusal_handler(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == SECRET_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._secret)
        return False


def server_interceptors(settings: ClusterSettings) -> list[grpc.ServerInterceptor]:
    """The interceptors an internal server installs: none (and a warning) when the
    cluster has no secret."""
    secret = cluster_secret(settings)
    if not secret:
        get_logger("auth").warning(
            "no_cluster_secret", detail=f"internal RPCs are open to anyone who can reach "
            f"this port; set cluster_secret in the config or {SECRET_ENV}")
        return []
    return [SecretInterceptor(secret)]
