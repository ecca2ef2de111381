"""The ``cuda_ipc`` transport: same host, the store's gpu arena mapped into this process.

Put: BeginPut(device) reserves slots in the gpu tier -> one kernel copies every payload
into the arena and checksums it on the way (dsum32) -> CommitPut. A gpu tier full of
pinned blocks *spills* the put into the store's host arena (DMA, summed on the device
first), and the put commits as its copies go, the store waiting for the landing token
the stream writes after them (kvstore.landing); after that, large puts go in pipelined
chunks (services.transfer.put_pipeline).
Get: Get(device) pins and says where: blocks in the gpu arena are copied device to
device (checksummed in the same pass); blocks the store keeps in its cpu arena come
from its shared memory, crc32-verified on the host and copied to the device. A block
whose checksum fails on arrival is read again through GetBlocks, where the store
verifies it itself. Payloads are CUDA tensors (host payloads are copied to the device
first); a get without ``out`` answers CUDA tensors on the arena's GPU.

The arena is opened by its GPU's UUID, so a process that sees that GPU under another
index (or another GPU of an NVLink domain, through peer access) maps the same memory.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import torch

from services.transfer.arena_ops import (
    begin_put,
    pinned_device_locations,
    release_anonymous,
    reread_bad,
    two_phase_put,
)
from services.transfer.base import Buffer, KVTransport, PutResult, bounded
from services.transfer.bulk import crcs
from services.transfer.contract.errors import (
    InvalidRequestError,
    StaleTransportError,
    wrap_rpc_error,
)
from services.transfer.device_copy import (
    checksum_blocks,
    copy_blocks,
    copy_runs,
    pin_host,
    unpin_host,
    write_token,
)
from services.transfer.host_id import host_id
from services.transfer.metrics import TransferMeter
from services.transfer.put_pipeline import PutHelpers, chunks, pipelined_put
from services.transfer.shm_transport import _open_arena
from splitserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc


class CudaIpcUnavailable(OSError):
    """The store's gpu arena cannot be mapped from here (no gpu tier, no CUDA, another
    host, a GPU this process does not see)."""


def local_device(gpu_uuid: str) -> int:
    """This process's index of the GPU with ``gpu_uuid``."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == gpu_uuid:
            return i
    raise CudaIpcUnavailable(f"this process does not see the store's GPU {gpu_uuid}")


def map_arena(arena: kvstore_pb2.CudaIpcArena) -> torch.Tensor:
    """The store's gpu arena as a flat uint8 CUDA tensor of this process."""
    index = local_device(arena.gpu_uuid)
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        index, arena.handle, arena.storage_bytes, arena.storage_offset,
        arena.ref_counter_handle, arena.ref_counter_offset, arena.event_handle or None,
        arena.event_sync_required)
    flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}")
    return flat.set_(storage, 0, (arena.arena_bytes,), (1,))


def _check_peer(describe: kvstore_pb2.DescribeResponse) -> None:
    if not describe.HasField("gpu") or not describe.gpu.handle:
        raise CudaIpcUnavailable("the store has no gpu tier")
    if not torch.cuda.is_available():
        raise CudaIpcUnavailable("this process has no CUDA device")
    if describe.host_id and describe.host_id != host_id():
        raise CudaIpcUnavailable(f"the store runs on another host ({describe.host_id})")


class CudaIpcTransport(KVTransport):
    name = "cuda_ipc"
    device_payloads = True  # gets answer device tensors; puts take them without staging

    def __init__(self, channel: grpc.Channel, describe: kvstore_pb2.DescribeResponse,
                 timeout_s: float | None = 60.0) -> None:
        _check_peer(describe)
        try:
            self._arena = map_arena(describe.gpu)
        except RuntimeError as e:  # the driver refused the handle
            raise CudaIpcUnavailable(f"cannot map the store's gpu arena: {e}") from e
        self.device = self._arena.device
        self.store_id = describe.store_id
        self._describe = describe
        self._host: torch.Tensor | None = None  # the store's cpu arena, mapped on demand
        self._pinned = False
        self._channel = channel
        self._stub = kvstore_pb2_grpc.KVStoreStub(channel)
        self.timeout_s = timeout_s
        self._meter = TransferMeter(self.name)
        self._spilling = False  # the store spilled our last put into its host arena
        self._put_helpers: PutHelpers | None = None
        self._map_host_early()

    def _map_host_early(self) -> None:
        """Maps and page-locks the store's cpu arena now: registering it with CUDA takes
        ~0.2 s a GB, which a worker pays while it starts instead of in its first request
        that reads a cpu-tier block. Where it cannot be mapped, a read that needs it
        says why."""
        if self._describe.shm_name:
            with contextlib.suppress(OSError):
                self._host_arena()

    # -- put ----------------------------------------------------------------------------
    def put(self, owner: str, refs: Sequence[common_pb2.BlockRef], payloads: Sequence[Buffer],
            block_nbytes: int) -> PutResult:
        if len(payloads) != len(refs):
            raise InvalidRequestError(f"{len(refs)} block refs but {len(payloads)} payloads")
        if not refs:
            return PutResult(0, 0)
        # after a put of ours spilled, a large one goes in chunks that overlap their RPCs
        pieces = chunks(len(refs), block_nbytes) if self._spilling else [range(len(refs))]
        t0 = time.perf_counter()
        stored, present, written = self._put_pieces(owner, refs, payloads, block_nbytes,
                                                    pieces)
        self._meter.observe("put", time.perf_counter() - t0, block_nbytes * written)
        return PutResult(stored, present)

    def _put_pieces(self, owner: str, refs: Sequence[common_pb2.BlockRef],
                    payloads: Sequence[Buffer], nbytes: int, pieces: list[range]
                    ) -> tuple[int, int, int]:
        """The put of ``pieces`` of the blocks: one two-phase put on this thread, or
        several pipelined (:mod:`services.transfer.put_pipeline`), whose first BeginPut
        travels while the payloads are gathered on the device -> (stored, present,
        written). (A 64 MiB put into the gpu tier measured 18-21 GB/s through the
        pipeline's threads, against 27-30 on this thread in earlier sessions.)"""
        device_sums: list[int] = []
        gathered: list = []  # (the payloads' flat device tensor, each one's offset)
        written = 0

        def gather() -> None:
            gathered[:] = self._on_device(payloads, nbytes)
            if self._spilling:
                device_sums[:] = checksum_blocks(*gathered, nbytes)

        def write(begun: kvstore_pb2.BeginPutResponse, slots: list[int],
                  piece: range) -> list[int]:
            """The piece's copies -> its checksums (0 for blocks held already). Where the
            gpu tier was full of pinned blocks (``spilled``) they go to the host arena by
            DMA, one per run of adjacent blocks, enqueued, then the landing token where
            the store gave a pad: their dsum32s are computed on the device before they
            cross, and the store stamps their crc32s after the commit (computed here as
            they landed, they held the put to the host threads' crc32 rate)."""
            nonlocal written
            base, offsets = gathered
            self._spilling = begun.spilled
            todo = [j for j, o in enumerate(slots) if o >= 0]
            src = [offsets[piece.start + j] for j in todo]
            dst = [slots[j] for j in todo]
            if begun.spilled:
                if not device_sums:
                    device_sums[:] = checksum_blocks(base, offsets, nbytes)
                got = [device_sums[piece.start + j] for j in todo]
                host = self._host_arena()
                copy_runs(base, src, host, dst, nbytes)
                if begun.landing_offset:
                    write_token(host, begun.landing_offset, begun.landing_token, self.device)
            else:
                got = copy_blocks(base, src, self._arena, dst, nbytes)
            written += len(todo)
            sums = [0] * len(slots)
            for j, c in zip(todo, got, strict=True):
                sums[j] = c
            return sums

        stream = torch.cuda.current_stream(self.device)
        if len(pieces) > 1:
            answers = pipelined_put(
                self._stub, self._helpers(), pieces,
                lambda piece: begin_put(self._stub, owner, refs[piece.start : piece.stop],
                                        nbytes, self.timeout_s, self.store_id, self._stale,
                                        device=True, landing=True),
                write, stream, self.timeout_s, meanwhile=gather)
            return (sum(a.stored for a in answers), sum(a.present for a in answers),
                    written)

        def write_landed(begun: kvstore_pb2.BeginPutResponse, slots: list[int]) -> list[int]:
            """The copies, landed before the commit unless the store waits for the
            landing token, and always before a failure aborts the put."""
            try:
                sums = write(begun, slots, pieces[0])
            except BaseException:
                stream.synchronize()
                raise
            if not begun.landing_offset:
                stream.synchronize()
            return sums

        gather()
        resp, _ = two_phase_put(self._stub, owner, refs, nbytes, self.timeout_s,
                                self.store_id, self._stale, write_landed, device=True,
                                landed=stream.synchronize)
        return resp.stored, resp.present, written

    def _helpers(self) -> PutHelpers:
        """The threads of this client's pipelined puts (started on the first)."""
        if self._put_helpers is None:
            self._put_helpers = PutHelpers.start("cuda-ipc-put")
        return self._put_helpers

    def _read_host(self, src: list[int], flat: torch.Tensor, dst: list[int],
                   nbytes: int) -> list[int]:
        """Blocks of the store's host arena into ``flat`` on this GPU -> their dsum32,
        computed on the device after the copies (one DMA per run of adjacent blocks;
        the sums are stream-ordered after them)."""
        copy_runs(self._host_arena(), src, flat, dst, nbytes)
        return checksum_blocks(flat, dst, nbytes)

    def _on_device(self, payloads: Sequence[Buffer], nbytes: int) -> tuple[torch.Tensor,
                                                                             list[int]]:
        """One flat uint8 tensor on the arena's GPU holding every payload, and each
        payload's byte offset in it: the payloads' own storage when they share one
        (rows of one export), else a copy."""
        rows = [_as_bytes(p) for p in payloads]
        for i, r in enumerate(rows):
            if r.numel() != nbytes:
                raise InvalidRequestError(f"payload {i} has {r.numel()} bytes; every "
                                          f"block is block_nbytes={nbytes} bytes")
        shared = _shared_base(rows, self.device)
        if shared is not None:
            return shared
        staged = torch.stack([r.to(self.device, non_blocking=True) for r in rows])
        return staged.view(-1), [i * nbytes for i in range(len(rows))]

    # -- get ----------------------------------------------------------------------------
    def get(self, owner: str, keys: Sequence[bytes], out: Sequence[Buffer] | None = None, *,
            longest_prefix: bool = False) -> list[Buffer]:
        if out is not None and len(out) != len(keys):
            raise InvalidRequestError(f"{len(keys)} keys but {len(out)} output buffers")
        if not keys:
            return []
        targets = None if out is None else _output_rows(out)
        dest = None if targets is None else _shared_base(targets, self.device)
        pin_owner = owner or f"ipc-get-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        try:
            rows, bad, nbytes = self._pin_and_fetch(pin_owner, list(keys), longest_prefix,
                                                    targets, dest)
            results: list[Any] = list(rows)
            results = reread_bad(self._channel, pin_owner, keys, len(rows), bad, results,
                                 None, longest_prefix, self.timeout_s)
            results = [r if isinstance(r, torch.Tensor) else _as_bytes(r).to(self.device)
                       for r in results]
        except grpc.RpcError as e:
            raise wrap_rpc_error(e) from None
        finally:
            release_anonymous(self._stub, owner, pin_owner)
        self._meter.observe("get", time.perf_counter() - t0, nbytes * len(rows))
        if targets is None:
            return results
        for r, o in zip(results, targets, strict=False):  # rows not written in place
            if r is not o:
                o.copy_(r)
        return list(out[: len(results)])

    def _pin_and_fetch(self, owner: str, keys: list[bytes], prefix: bool,
                       targets: list[torch.Tensor] | None,
                       dest: tuple[torch.Tensor, list[int]] | None
                       ) -> tuple[list[torch.Tensor], list[int], int]:
        """Pins ``keys`` (or their held prefix) and copies them here -> (rows, indices
        whose checksum failed, block size)."""
        located = pinned_device_locations(self._stub, owner, keys, prefix,
                                          bounded(self.timeout_s), self.store_id,
                                          self._stale)
        held = len(located[0])
        if not held:
            return [], [], 0
        nbytes = located[1][0]
        _check_sizes(targets, nbytes)
        window = None if dest is None else (dest[0], dest[1][:held], targets[:held])
        rows, bad = self._fetch(*located, nbytes, window)
        return rows, bad, nbytes

    def _fetch(self, offsets: list[int], lengths: list[int], sums: list[int],
               on_device: list[bool], device_sums: list[bool], nbytes: int,
               dest: tuple[torch.Tensor, list[int], list[torch.Tensor]] | None
               ) -> tuple[list[torch.Tensor], list[int]]:
        """The blocks on this GPU, in ``dest`` (a flat tensor, each block's offset in it
        and its row) or in a new buffer -> (rows, indices whose checksum failed). Blocks
        of the store's host arena with a device checksum are verified here after the
        copy; the others by crc32 on host threads. Returns when every copy is done (the
        caller may drop its pins)."""
        n = len(offsets)
        if any(length != nbytes for length in lengths):
            raise InvalidRequestError("blocks of one get must have one size")
        if dest is None:
            flat = torch.empty(n * nbytes, dtype=torch.uint8, device=self.device)
            where = [i * nbytes for i in range(n)]
            buf = list(flat.view(n, nbytes).unbind(0))
        else:
            flat, where, buf = dest
        dev = [i for i in range(n) if on_device[i]]
        got = copy_blocks(self._arena, [offsets[i] for i in dev], flat,
                          [where[i] for i in dev], nbytes)
        bad = [i for i, c in zip(dev, got, strict=True) if c != sums[i]]
        summed = [i for i in range(n) if not on_device[i] and device_sums[i]]
        if summed:
            got = self._read_host([offsets[i] for i in summed], flat,
                                  [where[i] for i in summed], nbytes)
            bad += [i for i, c in zip(summed, got, strict=True) if c != sums[i]]
        host = [i for i in range(n) if not on_device[i] and not device_sums[i]]
        if host:
            bad += self._from_host([offsets[i] for i in host], flat, [where[i] for i in host],
                                   [sums[i] for i in host], host, nbytes)
        return buf, sorted(bad)

    def _from_host(self, offsets: list[int], flat: torch.Tensor, where: list[int],
                   sums: list[int], index: list[int], nbytes: int) -> list[int]:
        """Copies blocks of the store's cpu arena to ``where`` in ``flat`` (one DMA per
        run of adjacent blocks) while their crc32s are computed on host threads ->
        ``index`` of those that failed. Returns when the copies are done."""
        copy_runs(self._host_arena(), offsets, flat, where, nbytes)
        got = crcs([self._host_view[off : off + nbytes] for off in offsets])
        torch.cuda.current_stream(self.device).synchronize()
        return [i for i, c, want in zip(index, got, sums, strict=True) if c != want]

    def _host_arena(self) -> torch.Tensor:
        """The store's cpu arena (shared memory), page-locked for fast copies."""
        if self._host is None:
            d = self._describe
            if not d.shm_name:
                raise InvalidRequestError("the store answered a cpu-arena block but "
                                          "exposes no shared-memory arena")
            self._mm = _open_arena(d.shm_name, d.shm_bytes, d.store_id)
            host = torch.frombuffer(self._mm, dtype=torch.uint8)
            self._pinned = pin_host(host.data_ptr(), host.numel())  # else pageable: slower
            self._host_view = memoryview(host.numpy())
            self._host = host
        return self._host

    def _stale(self, store_id: str) -> StaleTransportError:
        return StaleTransportError(f"the store restarted: it is {store_id} now, this "
                                   f"transport mapped the gpu arena of {self.store_id}")

    def close(self) -> None:
        if self._put_helpers is not None:
            self._put_helpers.shutdown()
        self._arena = torch.empty(0, dtype=torch.uint8)
        if self._host is not None:
            if self._pinned:
                unpin_host(self._host.data_ptr())
            self._host = None


def _as_bytes(payload: Buffer) -> torch.Tensor:
    """A flat uint8 tensor over a payload (a tensor of any device, or a host buffer)."""
    if isinstance(payload, torch.Tensor):
        if payload.dtype is torch.uint8 and payload.dim() == 1:  # a row: as it is (~3 us
            return payload                                       # a block otherwise)
        return payload.reshape(-1).view(torch.uint8)
    mv = memoryview(payload)
    return torch.frombuffer(mv.cast("B") if mv.format != "B" else mv, dtype=torch.uint8)


def _output_rows(out: Sequence[Buffer]) -> list[torch.Tensor]:
    """Flat uint8 tensors over a get's output buffers, writable in place."""
    rows = []
    for i, o in enumerate(out):
        if isinstance(o, torch.Tensor) and not o.is_contiguous():
            raise InvalidRequestError(f"output buffer {i} is not contiguous: the blocks "
                                      "would land in a copy of it")
        rows.append(_as_bytes(o))
    return rows


def _check_sizes(targets: list[torch.Tensor] | None, nbytes: int) -> None:
    for i, row in enumerate(targets or ()):
        if row.numel() != nbytes:
            raise InvalidRequestError(f"output buffer {i} has {row.numel()} bytes; the "
                                      f"blocks have {nbytes}")


def _shared_base(rows: list[torch.Tensor], device: torch.device
                 ) -> tuple[torch.Tensor, list[int]] | None:
    """(the storage all ``rows`` lie in as a flat tensor, each row's byte offset), when
    they are contiguous rows of one storage on ``device``; else None."""
    first = rows[0]
    if first.device != device or not all(r.is_contiguous() for r in rows):
        return None
    storage = first.untyped_storage()
    start = storage.data_ptr()
    at = [r.data_ptr() - start for r in rows]
    # inside the first row's storage, so on its device too (one address space)
    if min(at) < 0 or max(a + r.numel() for a, r in zip(at, rows, strict=True)) > \
            storage.nbytes():
        return None
    flat = torch.empty(0, dtype=torch.uint8, device=device)
    flat.set_(storage, 0, (storage.nbytes(),), (1,))
    return flat, at
