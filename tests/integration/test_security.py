"""Internal trust and worker-side limits on a cluster with a secret: store and worker
RPCs need the cluster secret, a forged store put is refused and changes no answer,
malformed bytes are INVALID_ARGUMENT, refusals are counted, the shm arena is the
owner's alone, deadlines stop worker requests and free everything, and tenants'
cache salts keep their prefixes apart."""

from __future__ import annotations

import functools
import os
import random
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.auth import SECRET_METADATA_KEY
from services.common.server import wait_until
from services.common.settings import ClusterSettings, TransferSettings
from services.engine import LLM, SamplingParams
from services.engine.block_hash import HashContext, block_hashes
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.conftest import (
    MODEL_NAME,
    RunningCluster,
    cluster_settings,
    request,
    running_cluster,
)

pytestmark = pytest.mark.slow

SECRET = "test-cluster-secret"
AUTH = ((SECRET_METADATA_KEY, SECRET),)
BLOCK = 16


@pytest.fixture(scope="module")
def secure_cluster(tiny_llama_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.cluster_secret = SECRET
    with running_cluster(settings, tmp_path_factory.mktemp("secure")) as rc:
        yield rc


def prompt(seed: int, n: int = 3 * BLOCK + 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def hash_ctx(settings: ClusterSettings) -> HashContext:
    return HashContext(settings.model.name, settings.model.block_size, settings.model.dtype)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and want in line)


@functools.cache
def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


def prefill_stub(c: RunningCluster) -> worker_pb2_grpc.PrefillWorkerStub:
    return worker_pb2_grpc.PrefillWorkerStub(channel(c.settings.prefill[0].address))


def decode_stub(c: RunningCluster) -> worker_pb2_grpc.DecodeWorkerStub:
    return worker_pb2_grpc.DecodeWorkerStub(channel(c.settings.decode[0].address))


def nothing_held(c: RunningCluster) -> bool:
    stats = c.store.stats()
    load = decode_stub(c).GetLoad(worker_pb2.LoadRequest(), metadata=AUTH, timeout=5)
    return not (stats.pins or stats.owners) and load.free_kv_blocks == load.total_kv_blocks \
        and not load.running


def test_store_rpcs_need_the_secret(secure_cluster: RunningCluster) -> None:
    address = secure_cluster.settings.kvstore.address
    ks = [os.urandom(16)]
    for metadata in ((), ((SECRET_METADATA_KEY, "wrong"),)):
        with KVStoreClient(address, metadata=metadata) as intruder:
            assert code_of(lambda c=intruder: c.lookup(ks)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=intruder: c.stats()) == grpc.StatusCode.UNAUTHENTICATED
    assert secure_cluster.store.lookup(ks) == 0  # members are served
    port = secure_cluster.settings.kvstore.http_port
    assert metric(port, "splitserve_rpc_refused_total", code="UNAUTHENTICATED") >= 4


def test_a_forged_put_is_refused_and_changes_no_answer(secure_cluster: RunningCluster,
                                                      tiny_llama_dir: Path) -> None:
    settings = secure_cluster.settings
    ids = prompt(seed=1)
    keys = block_hashes(ids, hash_ctx(settings))
    reference = LLM(model=str(tiny_llama_dir), dtype="float32", max_model_len=512,
                    num_kv_blocks=64, use_tqdm=False)
    want = reference.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True),
                              use_tqdm=False)[0]["token_ids"]
    nbytes = 8192  # tiny-llama's block; the refusal comes before any size check
    forged = [os.urandom(nbytes) for _ in keys]
    for transport in ("grpc", "shm"):
        with KVStoreClient(settings.kvstore.address, TransferSettings(transport=transport),
                           metadata=()) as forger:
            code = code_of(lambda f=forger: f.put("", keys, forged, nbytes))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    assert secure_cluster.store.lookup(keys) == 0
    assert secure_cluster.generate(request(ids, max_tokens=8)).tokens == want


def test_worker_rpcs_need_the_secret(secure_cluster: RunningCluster) -> None:
    pre, dec = prefill_stub(secure_cluster), decode_stub(secure_cluster)
    req = worker_pb2.PrefillRequest(request_id="intruder", model=MODEL_NAME,
                                    prompt_token_ids=prompt(seed=2),
                                    sampling=common_pb2.SamplingParams(max_tokens=2))
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: list(pre.Prefill(req, timeout=10))) == unauth
    assert code_of(lambda: pre.GetLoad(worker_pb2.LoadRequest(), timeout=5)) == unauth
    assert code_of(lambda: dec.Abort(common_pb2.AbortRequest(request_id="x"), timeout=5)) \
        == unauth
    assert dec.GetLoad(worker_pb2.LoadRequest(), metadata=AUTH, timeout=5).total_kv_blocks
    port = secure_cluster.settings.prefill[0].http_port
    assert metric(port, "splitserve_rpc_refused_total", code="UNAUTHENTICATED") >= 2


def test_malformed_bytes_are_invalid_argument(secure_cluster: RunningCluster) -> None:
    settings = secure_cluster.settings
    garbage = b"\xff\xff\xff\xff not a protobuf"
    for address, method in ((settings.kvstore.address, "/splitserve.v1.KVStore/Lookup"),
                            (settings.decode[0].address, "/splitserve.v1.DecodeWorker/GetLoad")):
        with grpc.insecure_channel(address) as ch:
            call = ch.unary_unary(method)
            with pytest.raises(grpc.RpcError) as e:
                call(garbage, metadata=AUTH, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "not a valid message" in e.value.details()
    assert metric(settings.kvstore.http_port, "splitserve_rpc_refused_total",
                  code="INVALID_ARGUMENT") >= 1


def test_the_shm_arena_is_the_owners_alone(secure_cluster: RunningCluster) -> None:
    name = secure_cluster.store.describe().shm_name
    assert name, "the store exposes no shm arena"
    assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600


def test_decode_deadline_stops_the_request_and_frees_everything(
        secure_cluster: RunningCluster) -> None:
    ids = prompt(seed=3)
    sampling = common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
    pre = worker_pb2.PrefillRequest(request_id="deadline-1", model=MODEL_NAME,
                                    prompt_token_ids=ids, sampling=sampling)
    first, ready = list(prefill_stub(secure_cluster).Prefill(pre, metadata=AUTH, timeout=30))
    dec = worker_pb2.DecodeRequest(
        request_id="deadline-1", model=MODEL_NAME, prompt_token_ids=ids,
        output_token_ids=[first.first_token_id], sampling=sampling, blocks=ready.blocks,
        kv_num_tokens=ready.kv_num_tokens, deadline_ms=300)
    start, got = time.monotonic(), 0
    with pytest.raises(grpc.RpcError) as e:
        for chunk in decode_stub(secure_cluster).Decode(dec, metadata=AUTH, timeout=30):
            got += len(chunk.token_ids)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert time.monotonic() - start < 5 and 0 < got < 399
    assert wait_until(lambda: nothing_held(secure_cluster), timeout_s=10)


def test_prefill_past_its_deadline_is_refused_and_holds_nothing(
        secure_cluster: RunningCluster) -> None:
    req = worker_pb2.PrefillRequest(request_id="deadline-2", model=MODEL_NAME,
                                    prompt_token_ids=prompt(seed=4, n=400), deadline_ms=1,
                                    sampling=common_pb2.SamplingParams(max_tokens=4))
    stub = prefill_stub(secure_cluster)
    code = code_of(lambda: list(stub.Prefill(req, metadata=AUTH, timeout=30)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: nothing_held(secure_cluster), timeout_s=10)


def test_a_tenants_prompt_is_invisible_to_another(secure_cluster: RunningCluster) -> None:
    ids = prompt(seed=5, n=4 * BLOCK + 3)

    def cached(salt: str) -> int:
        req = request(ids, max_tokens=2)
        req.cache_salt = salt
        return secure_cluster.generate(req).usage.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # a's prompt left no trace b can see
    assert cached("tenant-b") == 4 * BLOCK
    assert cached("tenant-a") == 4 * BLOCK
    assert cached("") == 0
