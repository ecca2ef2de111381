"""Internal trust: a cluster secret in gRPC metadata between cluster members.

Stores and workers refuse calls that lack the secret (``UNAUTHENTICATED``);
gateways, workers and stores send it on every internal call with
``call_metadata(settings)``. Health and reflection stay open so that probes and
``grpcurl`` keep working. With no secret configured everything is open.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

import grpc

from services.common.settings import ClusterSettings

SECRET_ENV = "SPLITSERVE_CLUSTER_SECRET"
SECRET_METADATA_KEY = "x-splitserve-secret"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def cluster_secret(settings: ClusterSettings) -> str | None:
    """The secret of this cluster: the environment overrides the config; '' means none."""
    secret = os.environ.get(SECRET_ENV, settings.cluster_secret)
    return secret or None


def call_metadata(settings: ClusterSettings) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that proves cluster membership on an internal call."""
    secret = cluster_secret(settings)
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


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

    def __init__(self, secret: str, on_refused: Callable[[str], None] | None = None) -> None:
        self._secret = secret.encode()
        self._on_refused = on_refused

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        if self._on_refused is not None:
            self._on_refused(method)
        return _refusal_handler(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == SECRET_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._secret)
        return False


def server_interceptors(settings: ClusterSettings,
                        on_refused: Callable[[str], None] | None = None
                        ) -> list[grpc.ServerInterceptor]:
    """The interceptors an internal server installs: none when the cluster has no secret."""
    secret = cluster_secret(settings)
    return [SecretInterceptor(secret, on_refused)] if secret else []
