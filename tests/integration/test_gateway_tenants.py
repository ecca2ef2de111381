"""Issue 7, problems 3 and 7: request ids belong to their client, Abort reaches only
the caller's own requests and ends them visibly, and one tenant's prompts are
invisible to another's ``cached_tokens``."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from splitserve.v1 import common_pb2, generation_pb2_grpc
from tests.integration.conftest import cluster_settings, collect, request, start_cluster

pytestmark = pytest.mark.slow
KEYS = ("key-of-alice", "key-of-bob")
REPO = Path(__file__).resolve().parents[2]


class Tenant:
    def __init__(self, stub: generation_pb2_grpc.GenerationStub, key: str | None) -> None:
        self.stub = stub
        self.metadata = (("x-api-key", key),) if key else ()

    def generate(self, req, timeout: float = 60):
        return collect(self.stub.Generate(req, timeout=timeout, metadata=self.metadata))

    def stream(self, req):
        return self.stub.Generate(req, timeout=60, metadata=self.metadata)

    def abort(self, request_id: str) -> common_pb2.AbortResponse:
        return self.stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=10,
                               metadata=self.metadata)


@pytest.fixture(scope="module")
def keyed(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1, api_keys=list(KEYS))
    cluster = start_cluster(settings, tmp_path_factory.mktemp("gateway-tenants"))
    channel = grpc.insecure_channel(settings.gateway.address)
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        yield cluster, Tenant(stub, KEYS[0]), Tenant(stub, KEYS[1]), Tenant(stub, None)
    finally:
        channel.close()
        cluster.stop()


def _long(request_id: str):
    req = request([5, 6, 7, 8], max_tokens=300)
    req.request_id = request_id
    return req


def test_calls_without_a_key_are_unauthenticated(keyed) -> None:
    _, _, _, anonymous = keyed
    with pytest.raises(grpc.RpcError) as err:
        anonymous.generate(request([1, 2, 3], max_tokens=2))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in err.value.details()


def test_same_id_from_two_tenants_both_served(keyed) -> None:
    _, alice, bob, _ = keyed
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda t: t.generate(_long("shared-id")), (alice, bob)))
    assert [g.finish_reason for g in got] == [common_pb2.FINISH_REASON_LENGTH] * 2


def test_foreign_abort_answers_like_unknown_and_changes_nothing(keyed) -> None:
    _, alice, bob, _ = keyed
    stream = alice.stream(_long("alice-private"))
    first = next(stream)
    assert first.token_ids
    assert bob.abort("alice-private") == bob.abort("no-such-request")
    rest = collect(stream)
    assert rest.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(first.token_ids) + len(rest.tokens) == 300


def test_own_abort_ends_the_stream_with_finish_reason_abort(keyed) -> None:
    cluster, alice, _, _ = keyed
    stream = alice.stream(_long("alice-aborts"))
    next(stream)
    assert alice.abort("alice-aborts").found
    rest = collect(stream)
    assert rest.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert rest.usage.completion_tokens < 300


def test_generate_cli_exits_nonzero_when_aborted(keyed) -> None:
    cluster, alice, _, _ = keyed
    cmd = [sys.executable, "-m", "services.cli", "generate", "x", "--address",
           cluster.settings.gateway.address, "--api-key", KEYS[0], "--request-id", "cli-abort",
           "--max-tokens", "400", "--ignore-eos"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while not alice.abort("cli-abort").found:
            assert time.monotonic() < deadline and proc.poll() is None, "never saw the request"
            time.sleep(0.05)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "finish=abort" in err and "aborted" in err


def test_cached_tokens_count_only_the_tenants_own_prefixes(keyed) -> None:
    _, alice, bob, _ = keyed
    rng = random.Random(7)
    prefix = [rng.randrange(3, 250) for _ in range(64)]
    assert alice.generate(request(prefix + [1], max_tokens=2)).usage.cached_tokens == 0
    assert alice.generate(request(prefix + [2], max_tokens=2)).usage.cached_tokens == 64
    # Bob's request with the same prefix learns nothing of Alice's...
    assert bob.generate(request(prefix + [3], max_tokens=2)).usage.cached_tokens == 0
    # ...nor does Alice's own request under another salt.
    salted = request(prefix + [4], max_tokens=2)
    salted.cache_salt = "project-2"
    assert alice.generate(salted).usage.cached_tokens == 0
