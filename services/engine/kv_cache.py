"""The paged KV cache: one block-major tensor.

Layout ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``: one block
of one sequence (all layers, K and V) is one contiguous span of ``block_nbytes``
bytes, so exporting or importing a block is a single copy. Attention works on
the per-layer strided views returned by :meth:`KVCache.layer`.

On CUDA, blocks leave through pinned host memory on a side stream (the step does
not wait for the copy; the payload's reader does) and arrive with one pinned,
non-blocking host->device copy per buffer they come in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def block_nbytes_for(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
) -> int:
    """Bytes of one KV block, without allocating anything."""
    itemsize = torch.empty((), dtype=DTYPE_BY_NAME[dtype]).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


def as_uint8(payload: Any) -> torch.Tensor:
    """A flat uint8 CPU (or device) tensor over a bytes-like payload, without copying."""
    if isinstance(payload, torch.Tensor):
        return payload.reshape(-1).view(torch.uint8)
    mv = memoryview(payload)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffers (bytes): we only read from them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv.cast("B") if mv.format != "B" else mv, dtype=torch.uint8)


def host_rows(num_blocks: int, block_nbytes: int, pinned: bool) -> list[torch.Tensor]:
    """The rows of one new ``[num_blocks, block_nbytes]`` uint8 host tensor, to receive
    blocks in place (e.g. ``KVStoreClient.get(..., out=rows)``) and hand them to
    ``add_request(kv_blocks=rows)``: adjacent rows reach the GPU in one copy.
    ``pinned`` (for a CUDA engine) is ignored where there is no CUDA."""
    return list(host_buffer(num_blocks, block_nbytes, pinned).unbind(0))


def host_buffer(num_blocks: int, block_nbytes: int, pinned: bool) -> torch.Tensor:
    """The ``[num_blocks, block_nbytes]`` uint8 host tensor behind :func:`host_rows`."""
    pin = pinned and torch.cuda.is_available()
    return torch.empty((num_blocks, block_nbytes), dtype=torch.uint8, pin_memory=pin)


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where ``a`` ends, in the same storage."""
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + a.numel()
    )


def _runs(rows: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Split flat uint8 rows of one size into runs adjacent in memory: (index of the
    run's first row, ``[n, nbytes]`` view of the run, no copy)."""
    runs: list[tuple[int, torch.Tensor]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or not _adjacent(rows[i - 1], rows[i]):
            first = rows[start]
            view = first.as_strided((i - start, first.numel()), (first.numel(), 1))
            runs.append((start, view))
            start = i
    return runs


class KVCache:
    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.block_shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        # zeros, not empty: masked-out slots must not hold NaN (0 * NaN = NaN)
        self.tensor = torch.zeros((num_blocks, *self.block_shape), dtype=dtype, device=device)
        self.device = self.tensor.device  # with its index ("cuda:0"), for comparisons
        self.as_bytes = self.tensor.view(torch.uint8).view(num_blocks, -1)  # [blocks, nbytes]
        # the same rows as 8-byte words: gathers and scatters of whole blocks move a word
        # per element (on byte rows torch's index kernels run several times slower)
        self._word = torch.int64 if self.as_bytes.shape[1] % 8 == 0 else torch.uint8
        self._as_words = self.as_bytes.view(self._word)
        self.is_cuda = self.device.type == "cuda"
        self._copy_stream: torch.cuda.Stream | None = None  # device->host copies
        self._gather_stream: torch.cuda.Stream | None = None  # exports gathered ahead
        self._in_flight: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # host->device
        # blocks leave as device rows (the store's gpu tier takes them over cuda_ipc)
        self.export_device = False

    @property
    def block_nbytes(self) -> int:
        return self.as_bytes.shape[1]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided (K, V) views of layer ``i``, each ``[num_blocks, block_size, kv_heads, dim]``."""
        return self.tensor[:, i, 0], self.tensor[:, i, 1]

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Block ids as a device tensor, without a synchronizing copy on CUDA."""
        idx = torch.tensor(list(block_ids), dtype=torch.long, pin_memory=self.is_cuda)
        return idx.to(self.device, non_blocking=True)

    # ---- blocks out ----
    def export_blocks_async(
        self, block_ids: Sequence[int], after: torch.cuda.Event | None = None, *,
        to_host: bool = False,
    ) -> tuple[list[Any], Callable[[], None] | None]:
        """Start copying blocks out: (payloads, wait). Each payload is a memoryview of
        exactly ``block_nbytes`` bytes that owns its memory; its bytes are there once
        ``wait()`` has returned (``wait`` is None when they already are). Later steps
        may reuse the blocks at once: the gather is ordered before them. With
        ``export_device`` (and not ``to_host``) the payloads are device rows instead.

        ``after`` (CUDA): the blocks hold their bytes once this event has passed; the
        gather then waits for it alone, not for work queued since (a step launched
        ahead, which may write only past the blocks' valid tokens)."""
        if not block_ids:
            return [], None
        if not self.is_cuda:
            return self._views(self._gather(block_ids)), None
        compute, stream = torch.cuda.current_stream(self.device), self._side_stream()
        if after is None:
            gathered = self._gather(block_ids)
            ready = torch.cuda.Event()
            ready.record(compute)
            stream.wait_stream(compute)
        else:
            gathered, ready = self._gather_after(after, block_ids)
            compute.wait_event(ready)  # later steps may reuse the blocks: after the gather
            stream.wait_event(ready)
        if self.export_device and not to_host:  # a reader on another stream waits
            return list(gathered.unbind(0)), ready.synchronize
        gathered.record_stream(stream)  # not reused elsewhere before the copy
        host = torch.empty(gathered.shape, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(gathered, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return self._views(host), done.synchronize

    def _gather_after(self, after: torch.cuda.Event, block_ids: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Gather blocks on a stream of gathers only (so that the compute stream,
        which waits for it, never waits for a device->host copy): (blocks, event
        passed once they are gathered)."""
        if self._gather_stream is None:
            self._gather_stream = torch.cuda.Stream(device=self.device)
        gather = self._gather_stream
        gather.wait_event(after)
        with torch.cuda.stream(gather):
            gathered = self._gather(block_ids)
            ready = torch.cuda.Event()
            ready.record(gather)
        return gathered, ready

    def _gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """``[n, block_nbytes]`` uint8: a copy of the blocks, in one kernel."""
        return self._as_words.index_select(0, self._index(block_ids)).view(torch.uint8)

    def _scatter(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """``rows`` (``[n, block_nbytes]`` uint8 on this device) into the blocks."""
        if self._word is not torch.uint8 and (rows.data_ptr() % 8 or not rows.is_contiguous()):
            rows = rows.clone(memory_format=torch.contiguous_format)  # aligned, dense
        self._as_words.index_copy_(0, self._index(block_ids), rows.view(self._word))

    def export_blocks(self, block_ids: Sequence[int]) -> list[memoryview]:
        """Copy blocks out to host memory and wait for them (a swap-out)."""
        payloads, wait = self.export_blocks_async(block_ids, to_host=True)
        if wait is not None:
            wait()
        return payloads

    def export_block(self, block_id: int) -> memoryview:
        return self.export_blocks([block_id])[0]

    @staticmethod
    def _views(host: torch.Tensor) -> list[memoryview]:
        # each row's numpy base keeps ``host`` (pinned or not) alive
        return [memoryview(row) for row in host.numpy()]

    def _side_stream(self) -> torch.cuda.Stream:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        return self._copy_stream

    # ---- blocks in ----
    def check_payload(self, payload: Any) -> None:
        self._row(payload)

    def _row(self, payload: Any) -> torch.Tensor:
        row = as_uint8(payload)
        if row.numel() != self.block_nbytes:
            raise ValueError(
                f"KV block payload has {row.numel()} bytes, a block has {self.block_nbytes}"
            )
        return row

    def import_blocks(self, items: Sequence[tuple[int, Any]]) -> None:
        """Copy payloads into blocks: [(block id, bytes-like or uint8 tensor of
        block_nbytes)]. On CUDA, host payloads in pinned tensors are read after this
        returns (in stream order): do not write into them afterwards. Rows of one
        host tensor that are adjacent (e.g. from :func:`host_rows`) move in one copy."""
        if not items:
            return
        ids = [bid for bid, _ in items]
        rows = [self._row(payload) for _, payload in items]
        if not self.is_cuda:
            for bid, row in zip(ids, rows, strict=True):
                self.as_bytes[bid].copy_(row)
            return
        host = [i for i, row in enumerate(rows) if row.device.type == "cpu"]
        other = [i for i, row in enumerate(rows) if row.device.type != "cpu"]  # CUDA IPC views
        if other:  # device rows: each run adjacent in memory (one get's buffer) as it is
            dev_ids = [ids[i] for i in other]
            for start, run in _runs([rows[i] for i in other]):
                self._scatter(dev_ids[start : start + run.shape[0]], run.to(self.device))
        if host:
            self._upload([ids[i] for i in host], [rows[i] for i in host])

    def _upload(self, ids: list[int], rows: list[torch.Tensor]) -> None:
        """Host rows -> their blocks: each pinned run as it is, the rest staged into one
        pinned buffer first; one non-blocking host->device copy per buffer."""
        self._forget_done()
        loose_ids: list[int] = []
        loose: list[torch.Tensor] = []
        for start, run in _runs(rows):
            run_ids = ids[start : start + run.shape[0]]
            if run.is_pinned():
                self._upload_run(run_ids, run)
            else:
                loose_ids += run_ids
                loose += list(run.unbind(0))
        if loose:
            staged = torch.empty((len(loose), self.block_nbytes), dtype=torch.uint8,
                                 pin_memory=True)
            torch.stack(loose, out=staged)
            self._upload_run(loose_ids, staged)

    def _upload_run(self, ids: list[int], run: torch.Tensor) -> None:
        self._scatter(ids, run.to(self.device, non_blocking=True))
        # the host memory may not be torch's own pinned memory (which guards itself):
        # keep it alive until the copy has read it
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._in_flight.append((done, run))

    def _forget_done(self) -> None:
        self._in_flight = [(e, t) for e, t in self._in_flight if not e.query()]

    def import_block(self, block_id: int, payload: Any) -> None:
        self.import_blocks([(block_id, payload)])
