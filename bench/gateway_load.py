"""Load on the gateway: many concurrent streams, what they end with, what they cost it.

    splitserve bench gateway_load --streams 2000 --requests 2000 --max-tokens 16
    python -m bench.gateway_load --address 127.0.0.1:50051 --streams 64 --requests 640

Without ``--address`` it starts a local cluster (dummy tiny-llama, 1 prefill and
1 decode worker) whose admission bounds fit ``--streams``. ``--streams`` clients
each send requests back to back until ``--requests`` are done. It reports how
the requests ended (by status), TTFT and end-to-end percentiles, and, when it
knows the gateway's pid, the gateway's CPU time per request and its RSS before
and after (``--rss-every N`` samples it every N requests: the soak for memory
growth). ``--json`` writes the report as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass
class Report:
    streams: int
    requests: int
    max_tokens: int
    wall_s: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    refusals_without_retry_hint: int = 0
    details: dict[str, str] = field(default_factory=dict)  # one error message per status
    ttft_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    gateway_cpu_ms_per_request: float | None = None
    gateway_rss_mib: list[float] = field(default_factory=list)  # sampled along the run


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{p}": round(v[min(len(v) - 1, int(len(v) * p / 100))] * 1000, 2)
            for p in (50, 90, 99)}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_request(rng: random.Random, prompt_len: int, max_tokens: int,
                 deadline_ms: int, text: bool = False) -> generation_pb2.GenerateRequest:
    """A random prompt: ``prompt_len`` token ids, or as many letters of text."""
    req = generation_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        deadline_ms=deadline_ms)
    if text:
        req.prompt = "".join(rng.choice(string.ascii_letters + " ") for _ in range(prompt_len))
    else:
        req.prompt_token_ids.ids.extend(rng.randrange(3, 250) for _ in range(prompt_len))
    return req


class Load:
    def __init__(self, args: argparse.Namespace, gateway_pid: int | None) -> None:
        self.args, self.pid = args, gateway_pid
        self.report = Report(args.streams, args.requests, args.max_tokens)
        self.codes: Counter[str] = Counter()
        self.ttft: list[float] = []
        self.e2e: list[float] = []
        self.sent = 0
        self.done = 0

    async def one(self, stub: generation_pb2_grpc.GenerationStub, rng: random.Random) -> None:
        a = self.args
        start = time.perf_counter()
        req = make_request(rng, a.prompt_len, a.max_tokens, a.deadline_ms, a.text)
        call = stub.Generate(req, timeout=a.timeout)
        first = None
        try:
            async for msg in call:
                if msg.token_ids and first is None:
                    first = time.perf_counter() - start
                self.report.tokens += len(msg.token_ids)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            code = e.code()
            self.report.details.setdefault(code.name, e.details() or "")
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailing = dict(await call.trailing_metadata() or ())
                if "retry-after-ms" not in trailing:
                    self.report.refusals_without_retry_hint += 1
        self.codes[code.name] += 1
        if code == grpc.StatusCode.OK:
            self.e2e.append(time.perf_counter() - start)
            if first is not None:
                self.ttft.append(first)
        self.done += 1
        if self.pid and self.args.rss_every and self.done % self.args.rss_every == 0:
            self.report.gateway_rss_mib.append(round(proc_rss_mib(self.pid), 1))

    async def client(self, stub: generation_pb2_grpc.GenerationStub, seed: int) -> None:
        rng = random.Random(seed)
        while self.sent < self.args.requests:
            self.sent += 1
            await self.one(stub, rng)

    async def run(self) -> Report:
        a = self.args
        # Several connections, as many clients would open (one HTTP/2 connection per
        # channel caps concurrent streams at the server's limit).
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        channels = [grpc.aio.insecure_channel(a.address, options=options)
                    for _ in range(a.connections or max(1, a.streams // 50))]
        stubs = [generation_pb2_grpc.GenerationStub(c) for c in channels]
        cpu0 = proc_cpu_s(self.pid) if self.pid else 0.0
        if self.pid:
            self.report.gateway_rss_mib.append(round(proc_rss_mib(self.pid), 1))
        start = time.perf_counter()
        await asyncio.gather(*(self.client(stubs[i % len(stubs)], i) for i in range(a.streams)))
        self.report.wall_s = round(time.perf_counter() - start, 3)
        if self.pid:
            cpu = proc_cpu_s(self.pid) - cpu0
            self.report.gateway_cpu_ms_per_request = round(cpu * 1000 / max(1, self.done), 3)
            self.report.gateway_rss_mib.append(round(proc_rss_mib(self.pid), 1))
        for c in channels:
            await c.close()
        self.report.codes = dict(self.codes)
        self.report.ttft_ms, self.report.e2e_ms = _pct(self.ttft), _pct(self.e2e)
        return self.report


def start_local_cluster(streams: int, workdir: Path, max_len: int = 512):
    """A dummy tiny-llama cluster whose admission takes ``streams`` at once, each with
    up to ``max_len`` tokens (prompt and answer)."""
    from services.common.launcher import LocalCluster, with_free_ports
    from services.common.settings import ClusterSettings, Endpoint

    s = ClusterSettings(prefill=[Endpoint()], decode=[Endpoint()], ready_timeout_s=120.0)
    s.model.max_model_len = max(512, max_len)
    s.model.num_kv_blocks = max(1024, 2 * streams * (s.model.max_model_len // 16 + 1))
    s.gateway.max_queue = max(s.gateway.max_queue, streams)
    s = with_free_ports(s)
    config = workdir / "cluster.yaml"
    s.dump_yaml(config)
    return LocalCluster(s, config, workdir).start()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="a running gateway (default: start one)")
    p.add_argument("--gateway-pid", type=int, default=None, help="its pid, for CPU and RSS")
    p.add_argument("--streams", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=None, help="in all (default: --streams)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (or characters)")
    p.add_argument("--text", action="store_true", help="send text prompts (tokenized)")
    p.add_argument("--deadline-ms", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request RPC timeout")
    p.add_argument("--rss-every", type=int, default=0, help="sample gateway RSS every N")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--connections", type=int, default=0,
                   help="client connections (default: one per 50 streams)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`splitserve bench gateway_load`: prints and returns the report."""
    args.requests = args.requests or args.streams
    if args.address is not None:
        report = asdict(asyncio.run(Load(args, args.gateway_pid).run()))
    else:
        with tempfile.TemporaryDirectory(prefix="gwload-") as workdir:
            cluster = start_local_cluster(args.streams, Path(workdir),
                                          args.prompt_len + args.max_tokens + 16)
            args.address = cluster.settings.gateway.address
            try:
                report = asdict(asyncio.run(Load(args, cluster.find("gateway").proc.pid).run()))
            finally:
                cluster.stop()
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.gateway_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
