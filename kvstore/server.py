"""The KV store service: ``splitserve.v1.KVStore`` over the index of :mod:`kvstore.store`.

Control RPCs use the generated messages; the two bulk streams (PutBlocks, GetBlocks)
use the hand-rolled wire codec of :mod:`services.transfer.contract.wire`, so a payload is copied
once between the socket buffer and the arena.

Tiers and transports: the shm transport maps the CPU arena (the first tier) and reads
blocks at the offsets ``Get`` answers, so ``Get`` raises a block held in a slower tier
(disk) into the arena *before* it answers (pinned, checksum verified; no room: the
prefix ends there, or RESOURCE_EXHAUSTED). ``GetBlocks`` (grpc) streams a block from
whichever tier holds it and promotes it in the background. New blocks are always
written into the arena (BeginPut offsets are arena offsets), making room by demotion.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import REGISTRY, Counter, Histogram

from kvstore.landing import LANDING_WAIT_S
from kvstore.metrics import StoreCollector
from kvstore.moves import MOVES_WAIT_S
from kvstore.store import (
    InvalidArgument,
    KVStoreCore,
    Location,
    NotFound,
    ResourceExhausted,
    StoreError,
    check_key,
)
from kvstore.tiers import Tier, build_tiers
from kvstore.tiers.cpu import CpuTier
from kvstore.ucx_listener import start_ucx_listener
from services.common.auth import server_interceptors
from services.common.deadline import NO_DEADLINE_S
from services.common.logging import get_logger
from services.common.registry import Member, advertised_host, start_registrar
from services.common.server import run_until_signal, start_server
from services.common.settings import ClusterSettings
from services.transfer.bulk import address, copy
from services.transfer.contract import wire
from services.transfer.contract.checksum import IMPLEMENTATION as CRC_IMPL
from services.transfer.contract.checksum import crc32
from services.transfer.grpc_transport import MAX_CHUNK_BYTES
from services.transfer.host_id import host_id
from services.transfer.memory import tune_malloc
from splitserve.v1 import kvstore_pb2

SERVICE_NAME = "splitserve.v1.KVStore"
log = get_logger("kvstore")

RPC_SECONDS = Histogram("splitserve_kvstore_rpc_seconds", "KV store RPC latency", ["method"],
                        buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                 0.1, 0.25, 0.5, 1.0, 5.0))
STORE_BYTES = Counter("splitserve_kvstore_transfer_bytes",
                      "Block bytes the store took in (put) or handed out (get)",
                      ["transport", "direction"])


SLOW_RPC_S = 0.05  # a call that took longer is logged (what the store was doing then)
DEADLINE_MARGIN_S = 0.2  # a put's wait for room ends this long before its caller's deadline


def _status(e: StoreError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL)


def _rpc(method: Callable) -> Callable:
    """Maps StoreError to its status and times the call."""
    name = method.__name__
    timer = RPC_SECONDS.labels(name)

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            return method(self, request, context)
        except StoreError as e:
            if isinstance(e, ResourceExhausted):
                log.warning("put_refused", detail=str(e))
            context.abort(_status(e), str(e))
        finally:
            seconds = time.perf_counter() - t0
            timer.observe(seconds)
            if seconds > SLOW_RPC_S:
                log.info("slow_rpc", method=name, ms=round(seconds * 1000, 1))

    return wrapper


class KVStoreServicer:
    ucx_port, ucx_host = 0, ""  # the UCX listener's, when serve() started one

    def __init__(self, core: KVStoreCore, tier: CpuTier, store_id: str,
                 chunk_bytes: int = 4 << 20) -> None:
        self.core = core
        self.tier = tier
        self.store_id = store_id
        self.chunk_bytes = max(1, min(chunk_bytes, MAX_CHUNK_BYTES))
        self.hostname = socket.gethostname()
        self._gpu: kvstore_pb2.CudaIpcArena | bool | None = None

    @_rpc
    def Describe(self, request, context):  # noqa: N802 (gRPC method names)
        return kvstore_pb2.DescribeResponse(
            store_id=self.store_id, shm_name=self.tier.shm_name,
            shm_bytes=self.tier.arena_bytes if self.tier.shm_name else 0,
            hostname=self.hostname, tiers=[t.name for t in self.core.tiers],
            ucx_port=self.ucx_port, ucx_host=self.ucx_host, host_id=host_id(),
            gpu=self._gpu_arena())

    def _gpu_arena(self) -> kvstore_pb2.CudaIpcArena | None:
        """The gpu tier's arena as CUDA IPC handles, made once (None: no gpu tier)."""
        if self._gpu is None:
            tier = self.core.device_tier
            ipc = tier.ipc() if tier is not None else None  # type: ignore[attr-defined]
            self._gpu = kvstore_pb2.CudaIpcArena(**ipc) if ipc else False
        return self._gpu or None

    @_rpc
    def Lookup(self, request, context):  # noqa: N802
        n, per_tier = self.core.lookup(request.keys)
        return kvstore_pb2.LookupResponse(
            num_blocks=n,
            per_tier=[kvstore_pb2.TierPrefix(tier=t, num_blocks=c) for t, c in per_tier.items()])

    @_rpc
    def BeginPut(self, request, context):  # noqa: N802
        begun = self.core.begin_put(request.owner, request.blocks, request.block_nbytes,
                                    device=request.device, wait_s=_wait_s(context),
                                    landing=request.landing)
        if not context.is_active():  # the caller gave up while its room was made
            self.core.abort_put(begun.put_id)
            context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
        resp = kvstore_pb2.BeginPutResponse(put_id=begun.put_id, store_id=self.store_id,
                                            spilled=begun.spilled)
        if begun.pad is not None:
            resp.landing_offset, resp.landing_token = begun.pad
        if request.packed:
            resp.offsets.extend([-1 if s.present else s.offset for s in begun.slots])
        else:
            add = resp.slots.add
            for s in begun.slots:
                add(key=s.key, present=s.present, offset=s.offset, length=s.length)
        STORE_BYTES.labels("cuda_ipc" if request.device and not begun.spilled else "shm",
                           "put").inc(sum(s.length for s in begun.slots))
        return resp

    @_rpc
    def CommitPut(self, request, context):  # noqa: N802
        if request.abort:
            self.core.abort_put(request.put_id)
            return kvstore_pb2.CommitPutResponse()
        stored, present = self.core.commit_put(
            request.put_id, request.checksums, request.host_checksums,
            landing=request.landing, wait_s=_wait_s(context, LANDING_WAIT_S),
            wanted=context.is_active)
        return kvstore_pb2.CommitPutResponse(stored=stored, present=present)

    @_rpc
    def PutBlocks(self, request_iterator, context):  # noqa: N802
        it = iter(request_iterator)
        try:
            hdr, data = next(it)
        except StopIteration:
            return kvstore_pb2.CommitPutResponse()
        refs, nbytes = hdr.blocks, hdr.block_nbytes
        if not refs:
            if data.nbytes:
                raise _invalid("the first PutChunk must name the blocks (blocks, block_nbytes)")
            return kvstore_pb2.CommitPutResponse()
        begun = self.core.begin_put(hdr.owner, refs, nbytes, wait_s=_wait_s(context))
        if all(s.present for s in begun.slots):  # nothing to write: answer now
            stored, present = self.core.commit_put(begun.put_id, ())
            return kvstore_pb2.CommitPutResponse(stored=stored, present=present)
        views = [None if s.present else self.core.view(s) for s in begun.slots]
        addrs = [0 if v is None else address(v) for v in views]
        crcs = [0] * len(views)
        total, got, bi, boff = nbytes * len(refs), 0, 0, 0
        committed = False
        try:
            while True:
                n = data.nbytes
                if got + n > total:
                    raise _invalid(f"payload longer than {len(refs)} blocks x block_nbytes="
                                   f"{nbytes} = {total} bytes")
                src, pos = address(data) if n else 0, 0
                while pos < n:
                    take = min(nbytes - boff, n - pos)
                    if addrs[bi]:
                        crcs[bi] = crc32(data[pos : pos + take], crcs[bi])
                        copy(addrs[bi] + boff, src + pos, take)
                    pos += take
                    boff += take
                    if boff == nbytes:
                        bi, boff = bi + 1, 0
                got += n
                try:
                    more, data = next(it)
                except StopIteration:
                    break
                if more.blocks or more.block_nbytes or more.owner:
                    raise _invalid("only the first PutChunk of a stream carries header fields")
            if got != total:
                raise _invalid(f"payload is {got} bytes; {len(refs)} blocks x block_nbytes="
                               f"{nbytes} = {total} bytes expected")
            stored, present = self.core.commit_put(begun.put_id, crcs)
            committed = True
        finally:
            if not committed:
                self.core.abort_put(begun.put_id)
        STORE_BYTES.labels("grpc", "put").inc(total)
        return kvstore_pb2.CommitPutResponse(stored=stored, present=present)

    @_rpc
    def Get(self, request, context):  # noqa: N802
        # the reader maps the CPU arena (and, device, the gpu arena): blocks elsewhere
        # are moved into its home tier first
        locs = self.core.get(request.owner, request.keys, prefix=request.longest_prefix,
                             memory=True, device=request.device)
        resp = kvstore_pb2.GetResponse(store_id=self.store_id)
        lengths = [loc.length for loc in locs]
        sums = [loc.checksum for loc in locs]
        if request.device:  # device sums where known: the reader verifies on the device
            gpu = self.core.device_tier.name  # type: ignore[union-attr]
            known = [loc.device_checksum is not None for loc in locs]
            resp.on_device.extend([loc.tier == gpu for loc in locs])
            resp.device_sums.extend(known)
            sums = [loc.device_checksum if k else c
                    for loc, k, c in zip(locs, known, sums, strict=True)]
        if request.packed:
            resp.offsets.extend([loc.offset for loc in locs])
            resp.lengths.extend(lengths)
            resp.checksums.extend(sums)
        else:
            add = resp.blocks.add
            for loc, c in zip(locs, sums, strict=True):
                add(key=loc.key, offset=loc.offset, length=loc.length, checksum=c)
        STORE_BYTES.labels("cuda_ipc" if request.device else "shm", "get").inc(sum(lengths))
        return resp

    def GetBlocks(self, request, context) -> Iterator[bytes]:  # noqa: N802
        t0 = time.perf_counter()
        owner = request.owner or f"getblocks-{uuid.uuid4().hex}"
        prefix = request.longest_prefix
        try:
            locs = self.core.get(owner, request.keys, prefix=prefix)
        except StoreError as e:
            context.abort(_status(e), str(e))
        try:
            yield from self._messages(owner, request.keys, locs, prefix)
        except (_Corrupt, NotFound) as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        finally:
            if not request.owner:
                self.core.release(owner)
            RPC_SECONDS.labels("GetBlocks").observe(time.perf_counter() - t0)

    def _messages(self, owner: str, keys, locs: list[Location], prefix: bool) -> Iterator[bytes]:
        """Packed BlockData messages of ``chunk_bytes``: the first names every block's
        length, the data runs back to back across blocks (few messages for many small
        blocks); ``length`` is set too where a message starts a block. Each block's
        crc32 is verified before its first byte leaves; one that fails is dropped and
        raises _Corrupt, or in a prefix stream ends the prefix there."""
        chunk = self.chunk_bytes
        out = STORE_BYTES.labels("grpc", "get")
        lengths = [loc.length for loc in locs]
        pieces: list[memoryview] = []
        size = start_i = start_off = 0
        first = True

        def message() -> bytes:
            nonlocal pieces, size, first
            msg = wire.encode_block_data(start_i, start_off,
                                         0 if start_off or not lengths else lengths[start_i],
                                         pieces, lengths if first else ())
            out.inc(size)
            pieces, size, first = [], 0, False
            return msg

        for i, loc in enumerate(locs):
            view = self.core.verified(loc)  # another tier's block is read from there
            if view is None:
                log.warning("checksum_failure", key=loc.key.hex(), offset=loc.offset)
                if not prefix:
                    raise _Corrupt(f"block {loc.key.hex()} failed its checksum and was "
                                   "dropped; it is a miss now (recompute it)")
                self.core.unpin(owner, keys[i : len(locs)])  # the prefix ends before it
                if first:  # nothing sent yet: the first message names the prefix
                    lengths = lengths[:i]
                    if i:
                        yield message()
                    return
                if pieces:
                    yield message()
                yield wire.encode_block_data(0, 0, 0, (), num_blocks=i)
                return
            pos = 0
            while pos < loc.length:
                if not size:
                    start_i, start_off = i, pos
                take = min(chunk - size, loc.length - pos)
                pieces.append(view[pos : pos + take])
                size += take
                pos += take
                if size == chunk:
                    yield message()
        if pieces or (first and not prefix):
            yield message()

    @_rpc
    def Release(self, request, context):  # noqa: N802
        if not request.owner:
            raise _invalid("Release needs an owner (the request id that pinned the blocks)")
        if request.keys:
            return kvstore_pb2.ReleaseResponse(
                released=self.core.unpin(request.owner, request.keys))
        return kvstore_pb2.ReleaseResponse(released=self.core.release(request.owner))

    @_rpc
    def Pin(self, request, context):  # noqa: N802
        return kvstore_pb2.PinResponse(
            num_blocks=self.core.pin(request.owner, request.keys, request.ttl_s))

    @_rpc
    def Stats(self, request, context):  # noqa: N802
        s = self.core.stats()
        return kvstore_pb2.StatsResponse(
            blocks=s.blocks, pinned_blocks=s.pinned_blocks, pins=s.pins, owners=s.owners,
            hits=s.hits, misses=s.misses, evictions=s.evictions, puts_refused=s.puts_refused,
            checksum_failures=s.checksum_failures, promotions=s.promotions,
            demotions=s.demotions, moves_pending=s.moves_pending,
            landings_missed=s.landings_missed,
            tiers=[kvstore_pb2.TierStats(
                tier=t.name, kind=t.kind, capacity_bytes=t.capacity_bytes,
                used_bytes=t.used_bytes, blocks=t.blocks, hits=t.hits, misses=t.misses,
                promotions=t.promotions, demotions=t.demotions, evictions=t.evictions,
                checksum_failures=t.checksum_failures) for t in s.tiers])

    @_rpc
    def Prefetch(self, request, context):  # noqa: N802
        keys = [check_key(k) for k in request.keys]
        raised, resident, missing, failed = self.core.promote(keys)
        return kvstore_pb2.PrefetchResponse(promoted=raised, resident=resident,
                                            missing=missing, failed=failed)


def _wait_s(context: grpc.ServicerContext, most: float = MOVES_WAIT_S) -> float | None:
    """How long a call may wait (for room being made, for a landing token): ``most``,
    and within the caller's deadline (a little before it, so that the answer still
    reaches the caller); None without a deadline (the store's own bound)."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= NO_DEADLINE_S:
        return None
    return min(most, max(0.0, remaining - DEADLINE_MARGIN_S))


def _invalid(message: str) -> StoreError:
    return InvalidArgument(message)


class _Corrupt(Exception):
    """A block failed its checksum while a GetBlocks stream was being built."""


def add_to_server(servicer: KVStoreServicer, server: grpc.Server) -> None:
    pb = kvstore_pb2

    def unary(fn, req):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString,
            response_serializer=lambda m: m.SerializeToString())

    handlers = {
        "Describe": unary(servicer.Describe, pb.DescribeRequest),
        "Lookup": unary(servicer.Lookup, pb.LookupRequest),
        "BeginPut": unary(servicer.BeginPut, pb.BeginPutRequest),
        "CommitPut": unary(servicer.CommitPut, pb.CommitPutRequest),
        "PutBlocks": grpc.stream_unary_rpc_method_handler(
            servicer.PutBlocks, request_deserializer=wire.decode_put_chunk,
            response_serializer=pb.CommitPutResponse.SerializeToString),
        "Get": unary(servicer.Get, pb.GetRequest),
        "GetBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.GetBlocks, request_deserializer=pb.GetRequest.FromString,
            response_serializer=wire.identity),
        "Release": unary(servicer.Release, pb.ReleaseRequest),
        "Pin": unary(servicer.Pin, pb.PinRequest),
        "Stats": unary(servicer.Stats, pb.StatsRequest),
        "Prefetch": unary(servicer.Prefetch, pb.PrefetchRequest),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def serve(settings: ClusterSettings, index: int = 0) -> None:
    """Runs the KV store until SIGTERM; the shared-memory arena is unlinked on exit."""
    ks = settings.kvstore
    tune_malloc()
    store_id = f"kvstore-{index}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tiers = build_tiers(ks.tier_specs(), store_id)
    collector = None
    core = None
    try:
        core = KVStoreCore(tiers, pin_ttl_s=ks.pin_ttl_s)
        core.set_watermarks(ks.demote_high, ks.demote_low)
        tier = arena_tier(tiers)
        servicer = KVStoreServicer(core, tier, store_id, settings.transfer.chunk_bytes)
        if ucx := start_ucx_listener(settings, core, tier, store_id):
            servicer.ucx_port, servicer.ucx_host = ucx.port, ks.host
        collector = StoreCollector(core)
        REGISTRY.register(collector)
        handle = start_server("kvstore", ks, lambda s: add_to_server(servicer, s),
                              [SERVICE_NAME], interceptors=server_interceptors(settings))

        def expire_loop() -> None:  # pins of dead owners go even when nobody calls
            interval = max(0.05, min(1.0, ks.pin_ttl_s / 4))
            while not handle.stopping.wait(interval):
                core.expire()

        threading.Thread(target=expire_loop, name="kv-expiry", daemon=True).start()
        handle.set_ready(True)
        registrar = start_registrar(settings, Member(
            "kvstore", f"{advertised_host(ks.host)}:{ks.port}", http_port=ks.http_port), dict)
        log.info("ready", store_id=store_id, shm=tier.shm_name, pin_ttl_s=ks.pin_ttl_s,
                 crc32=CRC_IMPL, blocks=len(core._blocks),
                 tiers=[f"{t.name}:{t.capacity_bytes}" for t in tiers])
        run_until_signal(handle)
        if registrar is not None:
            registrar.stop()
    finally:
        if collector is not None:
            REGISTRY.unregister(collector)
        if core is not None:
            core.close()
        else:
            for t in tiers:
                t.close()


def arena_tier(tiers: list[Tier]) -> CpuTier:
    """The CPU arena that shm readers map: the first host memory tier."""
    tier = next((t for t in tiers if t.has_view), None)
    if not isinstance(tier, CpuTier):
        raise ValueError("kvstore.tiers: a store needs a cpu tier (the arena host "
                         "transports write and the shm transport maps)")
    return tier
