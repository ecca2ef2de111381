"""Two hosts: the KV store in a network namespace behind a veth pair, the gateway and
workers in this one. Tokens equal the single engine; KV crosses over ucx (or grpc
where ucx is not installed), never shm; nothing stays pinned."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.netns import StoreInNetns, netns_pair, unavailable
from services.common.launcher import LocalCluster
from services.common.server import wait_until
from services.engine import LLM
from services.transfer import ucx_loop
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import generation_pb2_grpc
from tests.integration.conftest import cluster_settings, collect, expected, request
from tests.integration.test_cluster import prompts

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def _choices(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^splitserve_kv_transport_choices_total\{transport="(\w+)"\} ([0-9.e+]+)$', text, re.M)}


def test_store_on_another_host_serves_the_cluster(tiny_llama_dir: Path, tmp_path: Path,
                                                  reference: LLM) -> None:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    ref = reference
    ids = prompts(3, seed=31, lo=40, hi=90)
    with netns_pair() as pair, \
            StoreInNetns(pair, settings, tmp_path, env={"UCX_TLS": "tcp"}) as store:
        cluster = LocalCluster(settings, store.config, tmp_path,
                               roles=("prefill", "decode", "gateway")).start()
        try:
            with grpc.insecure_channel(settings.gateway.address) as ch:
                stub = generation_pb2_grpc.GenerationStub(ch)
                got = [collect(stub.Generate(request(p, max_tokens=8), timeout=60)).tokens
                       for p in ids]
            assert got == expected(ref, ids, 8)
            chosen = _choices(settings.prefill[0].http_port)
            assert "shm" not in chosen
            assert chosen.get("ucx" if ucx_loop.unavailable() is None else "grpc", 0) >= 1
            with KVStoreClient(store.address) as c:
                assert wait_until(lambda: (s := c.stats()).pins == 0 and s.owners == 0,
                                  timeout_s=10)
        finally:
            cluster.stop()
