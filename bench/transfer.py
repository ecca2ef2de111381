"""`splitserve bench transfer`: KV block throughput in and out of a store, per transport.

Starts a KV store (or uses --address), puts N MiB of blocks with an owner, gets them
back (fresh buffers, and straight into preallocated ones, as a decode worker does),
releases, and prints GB/s (1e9 bytes/s) for each transport. ``--floor`` adds what the
machine itself allows (see :mod:`bench.transfer_floor`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from services.common.launcher import LocalCluster, with_free_ports
from services.common.settings import ClusterSettings, TransferSettings, load_settings
from services.transfer import ShmUnavailable, TransportUnavailable, UcxUnavailable
from services.transfer.contract.checksum import IMPLEMENTATION as CRC_IMPL
from services.transfer.store_client import KVStoreClient

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="host:port of a running KV store (default: start one here)")
    p.add_argument("--config", default=None, help="cluster YAML for the started store")
    p.add_argument("--transport", default="all",
                   choices=["grpc", "shm", "ucx", "cuda_ipc", "all"])
    p.add_argument("--gpu", action="store_true",
                   help="give the started store a gpu tier (cuda:0) before its cpu tier and "
                        "add the cuda_ipc transport: device payloads, and the cpu tier's "
                        "blocks read to the GPU")
    p.add_argument("--netns", action="store_true",
                   help="start the store in a network namespace behind a veth pair (another "
                        "host on this machine; needs root) and measure across the link")
    p.add_argument("--ucx-tls", default=None,
                   help="UCX_TLS for this client and the started store (e.g. tcp: bytes "
                        "over the network even where UCX could take shared memory)")
    p.add_argument("--mib", type=int, default=64, help="MiB moved each way per round")
    p.add_argument("--block-kib", type=int, default=256, help="block size in KiB")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="grpc payload bytes per stream message (default: settings)")
    p.add_argument("--put-chunk-mib", type=float, default=None,
                   help="cuda_ipc: bytes of each piece of a pipelined (spilled) put "
                        "(default: services.transfer.put_pipeline.CHUNK_BYTES)")
    p.add_argument("--floor", action="store_true",
                   help="also measure what this machine allows (memcpy, crc32, raw gRPC)")
    p.add_argument("--tiers", action="store_true",
                   help="also measure the store's tiers in process: cpu put/get, disk "
                        "demotion (write+fsync) and reads (page cache and cold)")
    p.add_argument("--disk-path", default=None,
                   help="directory of the disk tier for --tiers (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--log-dir", default=None, help="where the started store logs")


def _gbps(nbytes: int, seconds: list[float]) -> dict[str, float]:
    rates = [nbytes / s / 1e9 for s in seconds]
    return {"best": round(max(rates), 3), "median": round(statistics.median(rates), 3)}


def _measure(client: KVStoreClient, payloads: list[memoryview], block: int,
             repeat: int) -> dict[str, Any]:
    nbytes = block * len(payloads)
    outs = [bytearray(block) for _ in payloads]
    times: dict[str, list[float]] = {"put": [], "get": [], "get_into": []}
    for r in range(repeat + 1):
        keys = [os.urandom(16) for _ in payloads]
        owner = f"bench-{os.getpid()}-{r}"
        t0 = time.perf_counter()
        res = client.put(owner, keys, payloads, block)
        t1 = time.perf_counter()
        got = client.get(owner, keys)
        t2 = time.perf_counter()
        client.get(owner, keys, out=outs)
        t3 = time.perf_counter()
        client.release(owner)
        if r == 0:  # warm-up round: check the bytes instead of timing
            if res.stored != len(keys):
                raise RuntimeError(f"stored {res.stored} of {len(keys)} blocks")
            if any(bytes(g) != p for g, p in zip(got, payloads, strict=True)) or any(
                    o != p for o, p in zip(outs, payloads, strict=True)):
                raise RuntimeError("blocks came back different")
            continue
        times["put"].append(t1 - t0)
        times["get"].append(t2 - t1)
        times["get_into"].append(t3 - t2)
        del got
    return {k: _gbps(nbytes, v) for k, v in times.items()}


def _run_against(address: str, args: argparse.Namespace, chunk_bytes: int) -> dict[str, Any]:
    block = args.block_kib * 1024
    count = max(1, args.mib * MiB // block)
    data = os.urandom(block * count)
    payloads = [memoryview(data)[i * block : (i + 1) * block] for i in range(count)]
    transports = ["grpc", "shm", "ucx"] if args.transport == "all" else [args.transport]
    if args.gpu and args.transport == "all":
        transports.insert(0, "cuda_ipc")
    result: dict[str, Any] = {"address": address, "mib": block * count / MiB,
                              "block_kib": args.block_kib, "blocks": count,
                              "repeat": args.repeat, "crc32": CRC_IMPL,
                              "chunk_mib": chunk_bytes / MiB, "transports": {}}
    for name in transports:
        client = KVStoreClient(address, TransferSettings(transport=name, chunk_bytes=chunk_bytes))
        try:
            try:
                client.transport  # noqa: B018 (opens it)
            except (ShmUnavailable, UcxUnavailable, TransportUnavailable) as e:
                result["transports"][name] = {"skipped": str(e)}
                continue
            if name == "cuda_ipc":
                from bench.transfer_gpu import measure_device

                result["transports"][name] = measure_device(client, data, block, count,
                                                            args.repeat)
                continue
            result["transports"][name] = _measure(client, payloads, block, args.repeat)
        finally:
            client.close()
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"KV transfer: {result['mib']:.0f} MiB in {result['blocks']} blocks of "
          f"{result['block_kib']} KiB, best (median) of {result['repeat']} rounds, "
          f"crc32={result['crc32']}, GB/s = 1e9 bytes/s")
    print(f"{'transport':<10} {'put GB/s':>16} {'get GB/s':>16} {'get->buf GB/s':>16}")
    for name, r in result["transports"].items():
        if "skipped" in r:
            print(f"{name:<10} skipped: {r['skipped']}")
            continue
        cells = [f"{r[k]['best']:.2f} ({r[k]['median']:.2f})" for k in ("put", "get", "get_into")]
        print(f"{name:<10} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
        if "kernel" in r:
            k = r["kernel"]
            print(f"{'':<10} the copy+dsum32 kernel alone: {k['best']:.1f} ({k['median']:.1f})"
                  " GB/s (device to device, no control RPCs)")
        if "plain_copy" in r:
            c = r["plain_copy"]
            print(f"{'':<10} one plain device copy of the same bytes: {c['best']:.1f} "
                  f"({c['median']:.1f}) GB/s (the reference)")
        for key, blocks in (("cpu_tier_to_gpu", "host-written blocks: crc32 on the host"),
                            ("demoted_to_gpu",
                             "blocks the gpu tier demoted: dsum32 on the device")):
            if key in r:
                c = r[key]
                print(f"{'':<10} the store's cpu tier -> this GPU: {c['best']:.2f} "
                      f"({c['median']:.2f}) GB/s ({blocks})")
        if "gpu_to_cpu_tier" in r:
            c = r["gpu_to_cpu_tier"]
            print(f"{'':<10} this GPU -> the store's cpu tier: {c['best']:.2f} "
                  f"({c['median']:.2f}) GB/s (puts the full gpu tier spills: dsum32 on "
                  "the device)")
        if r.get("spill_steps_ms"):
            steps = ", ".join(f"{k} {v:.2f}" for k, v in r["spill_steps_ms"].items())
            print(f"{'':<10} its steps, median ms a put: {steps}")
        if r.get("spill_timeline_ms"):
            print(f"{'':<10} the median put's steps, ms from its call:")
            spans = [f"{n} {a:.2f}-{b:.2f}" for n, a, b in r["spill_timeline_ms"]]
            for i in range(0, len(spans), 6):
                print(f"{'':<12}{', '.join(spans[i : i + 6])}")
        for note in r.get("spill_notes", []):
            print(f"{'':<10} note: {note}")
        if "cpu_tier_parts" in r:
            p = r["cpu_tier_parts"]
            print(f"{'':<10} its parts alone: DMA {p['dma']['best']:.2f} GB/s, crc32 on "
                  f"{p['threads']} threads {p['crc32']['best']:.2f} GB/s")
            if "shm_dma" in p:
                print(f"{'':<10} DMA from registered shared memory: one copy "
                      f"{p['shm_dma']['best']:.2f} GB/s, block by block "
                      f"{p['shm_dma_blocks']['best']:.2f} GB/s (is_pinned: "
                      f"{p['shm_pinned']}); to it, one copy "
                      f"{p['shm_dma_to_host']['best']:.2f} GB/s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(args.config) if args.config else ClusterSettings()
    chunk = int(args.chunk_mib * MiB) if args.chunk_mib else settings.transfer.chunk_bytes
    if args.put_chunk_mib:
        from services.transfer import put_pipeline

        put_pipeline.CHUNK_BYTES = int(args.put_chunk_mib * MiB)
    if args.ucx_tls:  # this process (the client) and the store it starts
        os.environ["UCX_TLS"] = args.ucx_tls
    if args.address:
        result = _run_against(args.address, args, chunk)
    elif args.netns:
        result = _run_in_netns(settings, args, chunk)
    else:
        with_free_ports(settings)
        need = args.mib * MiB * 2 + 64 * MiB
        settings.kvstore.cpu_bytes = max(settings.kvstore.cpu_bytes, need)
        if args.gpu:  # room for every round: puts are timed without demotions
            gpu = args.mib * MiB * (args.repeat + 2) + 64 * MiB
            # the cpu tier holds the host rounds and every demoted device round
            settings.kvstore.tiers = [{"kind": "gpu", "bytes": gpu, "device": "cuda:0"},
                                      {"kind": "cpu", "bytes": 2 * gpu}]
        with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as tmp:
            config = Path(tmp) / "cluster.yaml"
            settings.dump_yaml(config)
            log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            with LocalCluster(settings, config, log_dir=log_dir, roles=("kvstore",)):
                result = _run_against(settings.kvstore.address, args, chunk)
    _print(result)
    if args.floor:
        from bench.transfer_floor import measure, print_floor

        block = args.block_kib * 1024
        result["floor"] = measure(max(1, args.mib * MiB // block) * block, block, chunk,
                                  args.repeat)
        print_floor(result["floor"])
    if args.tiers:
        result["tiers"] = measure_tiers(args.mib, args.block_kib * 1024, args.repeat,
                                        args.disk_path)
        print_tiers(result["tiers"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _run_in_netns(settings: ClusterSettings, args: argparse.Namespace,
                  chunk: int) -> dict[str, Any]:
    from bench.netns import StoreInNetns, netns_pair, unavailable

    reason = unavailable()
    if reason:
        raise SystemExit(f"--netns: {reason}")
    settings.kvstore.cpu_bytes = max(settings.kvstore.cpu_bytes, args.mib * MiB * 2 + 64 * MiB)
    with tempfile.TemporaryDirectory(prefix="splitserve-bench-") as tmp, netns_pair() as pair:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        with StoreInNetns(pair, settings, log_dir) as store:
            result = _run_against(store.address, args, chunk)
    result["netns"], result["ucx_tls"] = pair.ns, args.ucx_tls or ""
    return result


def measure_tiers(mib: int, block: int, repeat: int, disk_path: str | None) -> dict:
    """GB/s of the index over a cpu tier of ``mib`` and a disk tier under ``disk_path``:
    cpu put (copy + crc32), cpu get (pin + view + crc32), demotion to disk (each put of
    ``mib`` pushes as much down: copy, crc32, write, fsync, rename), disk get (read +
    crc32) warm (page cache) and cold (pages dropped with fadvise first)."""
    from kvstore.store import KVStoreCore
    from kvstore.tiers import CpuTier
    from kvstore.tiers.disk import DiskTier
    from services.transfer.contract.checksum import crc32

    count = max(1, mib * MiB // block)
    nbytes = count * block
    data = os.urandom(block)
    refs = [_Ref(os.urandom(16)) for _ in range(count * (repeat + 2))]
    rounds = [refs[i * count : (i + 1) * count] for i in range(repeat + 2)]
    times: dict[str, list[float]] = {k: [] for k in
                                     ("cpu_put", "cpu_get", "demote", "disk_get", "disk_get_cold")}
    with tempfile.TemporaryDirectory(prefix="splitserve-disk-", dir=disk_path) as tmp:
        cpu = CpuTier(nbytes)
        disk = DiskTier(nbytes * (repeat + 3) * 2, tmp)
        core = KVStoreCore([cpu, disk], promote_on_get=False)
        try:
            t = time.perf_counter()
            core.put("", rounds[0], [data] * count, block)  # fills the cpu tier
            times["cpu_put"].append(time.perf_counter() - t)
            for r in range(1, repeat + 2):
                keys = [x.key for x in rounds[r - 1]]
                times["cpu_get"].append(_read_all(core, keys, crc32))
                t = time.perf_counter()
                core.put("", rounds[r], [data] * count, block)  # round r-1 goes to disk
                times["demote"].append(time.perf_counter() - t)
                times["disk_get"].append(_read_all(core, keys, crc32))
                _drop_cache(Path(tmp))
                times["disk_get_cold"].append(_read_all(core, keys, crc32))
        finally:
            core.close()
    # a demoting put also copies its own blocks into the arena: take that time out
    put = statistics.median(times["cpu_put"])
    times["demote"] = [max(t - put, 1e-9) for t in times["demote"]]
    return {"mib": nbytes / MiB, "block_kib": block // 1024, "crc32": CRC_IMPL,
            "disk_path": disk_path or tempfile.gettempdir(), "fsync": True,
            **{k: _gbps(nbytes, v) for k, v in times.items()}}


class _Ref:
    def __init__(self, key: bytes) -> None:
        self.key, self.num_tokens, self.partial = key, 16, False


def _read_all(core, keys: list[bytes], crc32) -> float:
    t = time.perf_counter()
    for loc in core.get("bench", keys):
        if crc32(core.read(loc)) != loc.checksum:
            raise RuntimeError(f"block {loc.key.hex()} came back different")
    core.release("bench")
    return time.perf_counter() - t


def _drop_cache(path: Path) -> None:
    for f in path.glob("*.kv"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def print_tiers(r: dict) -> None:
    print(f"KV tiers in process: {r['mib']:.0f} MiB in blocks of {r['block_kib']} KiB, "
          f"disk under {r['disk_path']} (fsync), best (median) GB/s")
    for name, label in (("cpu_put", "cpu put"), ("cpu_get", "cpu get"),
                        ("demote", "cpu->disk demotion"), ("disk_get", "disk get (cached)"),
                        ("disk_get_cold", "disk get (cold)")):
        print(f"  {label:<22} {r[name]['best']:>7.2f} ({r[name]['median']:.2f})")
