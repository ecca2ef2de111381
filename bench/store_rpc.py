"""What a spilled put's two RPCs cost, with no copies: the control path alone.

``python3 -m bench.store_rpc``: starts a store (its own process, loopback gRPC) whose
gpu tier (on the CPU, 4 blocks) is full of pinned blocks, so every device put spills
into the cpu tier; then times BeginPut and CommitPut of device puts of 1, 42, 83 and
292 blocks (one chunk of a pipelined 512 MiB put is 83 of 1792 KiB). With small
blocks the store's crc32 stamps cost nothing; with ``--block-kib 1792`` they run
beside the next put's RPCs, as they do on a GPU host. Median milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings
from services.transfer.arena_ops import begin_put, commit_put
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

SIZES = (1, 42, 83, 292)


def _stale(store_id: str) -> Exception:
    return RuntimeError(f"another store answered: {store_id}")


def _refs(n: int) -> list[common_pb2.BlockRef]:
    return [common_pb2.BlockRef(key=os.urandom(16), num_tokens=16) for _ in range(n)]


def measure(stub: kvstore_pb2_grpc.KVStoreStub, store_id: str, nbytes: int,
            repeat: int) -> dict[int, tuple[float, float]]:
    """-> blocks: (BeginPut ms, CommitPut ms), medians of ``repeat`` spilled puts."""
    held, _ = begin_put(stub, "bench-hold", _refs(4), nbytes, 30, store_id, _stale,
                        device=True)  # the gpu tier, full and pinned
    commit_put(stub, held, [0] * 4, 30)
    out = {}
    for n in SIZES:
        begins, commits = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            begun, _ = begin_put(stub, "bench-put", _refs(n), nbytes, 30, store_id, _stale,
                                 device=True)
            t1 = time.perf_counter()
            commit_put(stub, begun, [1] * n, 30)
            commits.append(time.perf_counter() - t1)
            begins.append(t1 - t0)
            if not begun.spilled:
                raise RuntimeError("a put into the full gpu tier did not spill")
            stub.Release(kvstore_pb2.ReleaseRequest(owner="bench-put"))
        out[n] = (statistics.median(begins) * 1e3, statistics.median(commits) * 1e3)
    return out


def empty_rpc_ms(channel: grpc.Channel, repeat: int) -> float:
    """The median milliseconds of an RPC with nothing to do (a health check): the
    fixed cost every BeginPut and CommitPut pays."""
    stub = health_pb2_grpc.HealthStub(channel)
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-kib", type=int, default=4)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args(argv)
    nbytes = args.block_kib * 1024
    settings = ClusterSettings()
    with_free_ports(settings)
    # room for every put of a size, released ones evicted as the next size comes
    settings.kvstore.tiers = [
        {"kind": "gpu", "bytes": 4 * nbytes, "device": "cpu"},
        {"kind": "cpu", "bytes": (SIZES[-1] * 2 + 8) * nbytes, "shm": False}]
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as tmp:
        config = Path(tmp) / "cluster.yaml"
        settings.dump_yaml(config)
        with LocalCluster(settings, config, log_dir=Path(tmp), roles=("kvstore",)), \
                grpc.insecure_channel(settings.kvstore.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            store_id = stub.Describe(kvstore_pb2.DescribeRequest(), timeout=10).store_id
            got = measure(stub, store_id, nbytes, args.repeat)
            empty = empty_rpc_ms(channel, args.repeat)
    print(f"spilled device puts of {args.block_kib} KiB blocks, median of {args.repeat}:")
    print(f"  an RPC with nothing to do (a health check): {empty:6.3f} ms")
    for n, (begin, commit) in got.items():
        print(f"  {n:4d} blocks: BeginPut {begin:6.3f} ms, CommitPut {commit:6.3f} ms")


if __name__ == "__main__":
    main()
