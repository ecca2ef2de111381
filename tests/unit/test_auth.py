"""The cluster secret: where it comes from, and a real gRPC server (the KV store's
servicer in process) refusing calls without it while health stays open."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.server import KVStoreServicer, add_to_server
from kvstore.store import KVStoreCore
from kvstore.tiers.cpu import CpuTier
from services.common.auth import (
    SECRET_ENV,
    SECRET_METADATA_KEY,
    call_metadata,
    cluster_secret,
    server_interceptors,
    with_metadata,
)
from services.common.rpc_guard import REFUSED
from services.common.server import ServiceHandle, start_server
from services.common.settings import ClusterSettings, Endpoint
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

SECRET = "unit-secret"
LOOKUP = "/splitserve.v1.KVStore/Lookup"


def test_secret_from_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert cluster_secret(ClusterSettings()) is None
    assert call_metadata(ClusterSettings()) == ()
    assert cluster_secret(ClusterSettings(cluster_secret="from-yaml")) == "from-yaml"
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert cluster_secret(ClusterSettings(cluster_secret="from-yaml")) == "from-env"
    assert call_metadata(ClusterSettings()) == ((SECRET_METADATA_KEY, "from-env"),)
    monkeypatch.setenv(SECRET_ENV, "")  # an empty variable does not open a cluster
    assert cluster_secret(ClusterSettings(cluster_secret="from-yaml")) == "from-yaml"


@pytest.fixture(scope="module")
def store_server() -> Iterator[ServiceHandle]:
    tier = CpuTier(1 << 20)
    servicer = KVStoreServicer(KVStoreCore([tier]), tier, f"unit-{uuid.uuid4().hex[:6]}")
    handle = start_server("kvstore", Endpoint(port=0), lambda s: add_to_server(servicer, s),
                          ["splitserve.v1.KVStore"],
                          interceptors=server_interceptors(ClusterSettings(cluster_secret=SECRET)))
    handle.set_ready(True)
    yield handle
    handle.stop(0)


def lookup(port: int, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(with_metadata(channel, metadata))
        try:
            stub.Lookup(kvstore_pb2.LookupRequest(keys=[b"k" * 16]), timeout=5)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


def refused(code: str) -> float:
    return REFUSED.labels(LOOKUP, code)._value.get()


def test_calls_without_the_right_secret_are_refused(store_server: ServiceHandle) -> None:
    before = refused("UNAUTHENTICATED")
    assert lookup(store_server.port, ()) == grpc.StatusCode.UNAUTHENTICATED
    wrong = ((SECRET_METADATA_KEY, SECRET + "x"),)
    assert lookup(store_server.port, wrong) == grpc.StatusCode.UNAUTHENTICATED
    assert lookup(store_server.port, ((SECRET_METADATA_KEY, SECRET),)) == grpc.StatusCode.OK
    assert refused("UNAUTHENTICATED") == before + 2


def test_health_needs_no_secret(store_server: ServiceHandle) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{store_server.port}") as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_malformed_bytes_are_invalid_argument(store_server: ServiceHandle) -> None:
    before = refused("INVALID_ARGUMENT")
    with grpc.insecure_channel(f"127.0.0.1:{store_server.port}") as channel:
        call = channel.unary_unary(LOOKUP)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\xff\xff\xff\xff", metadata=((SECRET_METADATA_KEY, SECRET),), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Lookup" in e.value.details() and "not a valid message" in e.value.details()
    assert refused("INVALID_ARGUMENT") == before + 1
