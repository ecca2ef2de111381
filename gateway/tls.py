"""TLS on the gateway's public fronts (gRPC and the OpenAI HTTP front), from
``gateway.tls_cert`` and ``gateway.tls_key`` (PEM files, both or neither)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from services.common.settings import GatewaySettings, SettingsError


def tls_files(gw: GatewaySettings) -> tuple[Path, Path] | None:
    """The certificate chain and key paths; None when TLS is off. Raises
    :class:`SettingsError` naming what is missing."""
    if not gw.tls_cert and not gw.tls_key:
        return None
    if not (gw.tls_cert and gw.tls_key):
        given, missing = (("tls_cert", "tls_key") if gw.tls_cert else ("tls_key", "tls_cert"))
        raise SettingsError(f"gateway.{given} is set but gateway.{missing} is not: "
                            "TLS needs both (PEM certificate chain and private key)")
    paths = Path(gw.tls_cert), Path(gw.tls_key)
    for name, path in zip(("tls_cert", "tls_key"), paths, strict=True):
        if not path.is_file():
            raise SettingsError(f"gateway.{name}: {path} is not a readable file")
    return paths


def server_ssl_context(gw: GatewaySettings) -> ssl.SSLContext | None:
    files = tls_files(gw)
    if files is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*files)
    context.set_alpn_protocols(["http/1.1"])
    return context


def grpc_server_credentials(gw: GatewaySettings) -> grpc.ServerCredentials | None:
    files = tls_files(gw)
    if files is None:
        return None
    cert, key = files
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
