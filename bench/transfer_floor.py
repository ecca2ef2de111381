"""What this machine allows a KV transfer: `splitserve bench transfer --floor`.

Measures, with nothing of the KV store in the way: memcpy and crc32 speed on one thread,
crc32-then-copy of blocks over the threads a transport uses (the inner loop of the
``shm`` transport), and Python gRPC between two processes: a unary round trip, and
bytes streamed one way in messages the size the ``grpc`` transport uses, with identity
(de)serializers and no work on either side. A transport cannot beat these.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from services.common.launcher import free_port
from services.transfer.bulk import Copy, address, crc_copy, threads
from services.transfer.contract.checksum import crc32
from services.transfer.memory import tune_malloc

SERVICE = "splitserve.bench.Floor"
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _identity(b: bytes) -> bytes:
    return b


def _handlers() -> grpc.GenericRpcHandler:
    def sink(requests, context):
        n = sum(len(m) for m in requests)
        return n.to_bytes(8, "little")

    messages: dict[int, bytes] = {}

    def source(request, context):
        total, chunk = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:], "little")
        message = messages.get(chunk) or messages.setdefault(chunk, os.urandom(chunk))
        for _ in range(total // chunk):
            yield message

    def echo(request, context):
        return request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Sink": grpc.stream_unary_rpc_method_handler(
            sink, request_deserializer=_identity, response_serializer=_identity),
        "Source": grpc.unary_stream_rpc_method_handler(
            source, request_deserializer=_identity, response_serializer=_identity),
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=_identity, response_serializer=_identity),
    })


def serve(port: int) -> None:
    tune_malloc()
    server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _rates(nbytes: int, fn: Callable[[], object], repeat: int) -> dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best": round(nbytes / min(times) / 1e9, 3),
            "median": round(nbytes / statistics.median(times) / 1e9, 3)}


def _memory(nbytes: int, block: int, repeat: int) -> dict[str, Any]:
    src = np.frombuffer(os.urandom(nbytes), np.uint8).copy()
    dst = np.empty(nbytes + 4096, np.uint8)
    dst[:] = 0
    s, d = src.ctypes.data, dst.ctypes.data + 2048  # mid-page, as the arena's blocks
    views = [memoryview(src)[i : i + block] for i in range(0, nbytes, block)]
    copies = [Copy(v, address(v), d + i * block) for i, v in enumerate(views)]
    return {
        "memcpy_1thread": _rates(nbytes, lambda: ctypes.memmove(d, s, nbytes), repeat),
        "crc32_1thread": _rates(nbytes, lambda: crc32(memoryview(src)), repeat),
        f"crc32_then_copy_{threads()}threads": _rates(nbytes, lambda: crc_copy(copies), repeat),
    }


def _grpc(nbytes: int, chunk: int, repeat: int) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.transfer_floor", "--serve", str(port)])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=30)
        sink = channel.stream_unary(f"/{SERVICE}/Sink", request_serializer=_identity,
                                    response_deserializer=_identity)
        source = channel.unary_stream(f"/{SERVICE}/Source", request_serializer=_identity,
                                      response_deserializer=_identity)
        echo = channel.unary_unary(f"/{SERVICE}/Echo", request_serializer=_identity,
                                   response_deserializer=_identity)
        message = os.urandom(chunk)
        ask = nbytes.to_bytes(8, "little") + chunk.to_bytes(8, "little")
        put = _rates(nbytes, lambda: sink(iter([message] * (nbytes // chunk))), repeat)
        get = _rates(nbytes, lambda: sum(len(m) for m in source(ask)), repeat)
        rtts = []
        for _ in range(200):
            t0 = time.perf_counter()
            echo(b"x" * 64)
            rtts.append(time.perf_counter() - t0)
        channel.close()
        return {"stream_put": put, "stream_get": get, "chunk_mib": chunk / (1 << 20),
                "unary_rtt_us": {"best": round(min(rtts) * 1e6),
                                 "median": round(statistics.median(rtts) * 1e6)}}
    finally:
        proc.terminate()
        proc.wait(10)


def measure(nbytes: int, block: int, chunk: int, repeat: int) -> dict[str, Any]:
    tune_malloc()
    return {"memory": _memory(nbytes, block, repeat), "grpc": _grpc(nbytes, chunk, repeat)}


def print_floor(floor: dict[str, Any]) -> None:
    print("this machine, nothing of the store in the way (GB/s, best (median)):")
    for name, r in floor["memory"].items():
        print(f"  {name:<28} {r['best']:.2f} ({r['median']:.2f})")
    g = floor["grpc"]
    for name in ("stream_put", "stream_get"):
        r = g[name]
        print(f"  grpc {name} {g['chunk_mib']:g} MiB msgs  {r['best']:.2f} ({r['median']:.2f})")
    rtt = g["unary_rtt_us"]
    print(f"  grpc unary round trip      {rtt['best']} us ({rtt['median']} us)")


if __name__ == "__main__":  # the raw gRPC peer: python -m bench.transfer_floor --serve PORT
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
