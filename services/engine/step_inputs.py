"""A step's integer inputs, built with numpy in one persistent (pinned) host buffer
and moved to the device in one copy.

Two layouts share the buffers:

* ``general`` (any batch): sections packed one after another, sized by the step;
* ``decode`` (one token per sequence, CUDA-graph replay): every section at a
  fixed offset for ``max_seqs`` rows, so a graph captured on views of the device
  buffer reads each step's values. Rows past the batch are padding: slot -1
  (nothing written) and length 0 (nothing read).

Block tables are int32 rows of ``max_blocks`` entries; only the first
``ceil(context / block_size)`` of a row are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from services.engine.attention import AttentionMetadata, PrefillChunk
from services.engine.scheduler import ScheduledSeq


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] (padded to the graph size on replay)
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the hidden states that sample
    num_tokens: int  # real tokens (without padding)


class StepInputs:
    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int,
        device: torch.device,
    ) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.max_blocks, self.block_size = max_blocks, block_size
        self.device = device
        general = 3 * max_tokens + 4 * max_seqs + 1 + max_seqs * max_blocks
        decode = 4 * max_seqs + max_seqs * max_blocks
        size = max(general, decode)
        cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int32, device=device) if cuda else self.host
        self._copied: torch.cuda.Event | None = None
        self.tables = BlockTableRows(4 * max_seqs, max_blocks)

    # ---- the fixed decode layout ----
    def decode_views(self, rows: int) -> StepBatch:
        """Device views of the decode layout for a batch of ``rows`` (graph capture)."""
        s, w = self.max_seqs, self.max_blocks
        d = self.dev
        tables = d[4 * s : 4 * s + s * w].view(s, w)[:rows]
        meta = AttentionMetadata(
            slot_mapping=d[2 * s : 2 * s + rows],
            num_decodes=rows,
            decode_block_tables=tables,
            decode_seq_lens=d[3 * s : 3 * s + rows],
        )
        return StepBatch(d[:rows], d[s : s + rows], meta, d[:0], rows)

    def fill_decode(self, scheduled: list[ScheduledSeq], rows: int) -> int:
        """Write a pure-decode batch into the decode layout, padded to ``rows``; copy
        it to the device. Returns the longest context."""
        n, s, w, bs = len(scheduled), self.max_seqs, self.max_blocks, self.block_size
        h = self.host_np
        self._wait_host()
        if n == 0:
            h[:rows] = h[s : s + rows] = h[3 * s : 3 * s + rows] = 0
            h[2 * s : 2 * s + rows] = -1
            self._upload(4 * s)
            return 0
        pos = np.fromiter((x.start for x in scheduled), dtype=np.int64, count=n)
        h[:n] = np.fromiter((x.seq.token_ids[x.start] for x in scheduled), np.int32, count=n)
        h[s : s + n] = pos
        h[3 * s : 3 * s + n] = pos + 1
        h[n:rows] = 0
        h[s + n : s + rows] = 0
        h[3 * s + n : 3 * s + rows] = 0
        h[2 * s + n : 2 * s + rows] = -1
        tables = h[4 * s : 4 * s + s * w].reshape(s, w)
        tables[:n] = self.tables.gather(scheduled)
        blocks = tables[np.arange(n), pos // bs].astype(np.int64)
        h[2 * s : 2 * s + n] = blocks * bs + pos % bs
        self._upload(4 * s + n * w)
        return int(pos.max()) + 1

    # ---- the general layout ----
    def fill_general(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        """Any batch, decodes first then prefill chunks."""
        n, bs = len(scheduled), self.block_size
        self._wait_host()
        starts = np.fromiter((x.start for x in scheduled), dtype=np.int64, count=n)
        counts = np.fromiter((x.num_new_tokens for x in scheduled), dtype=np.int64, count=n)
        ends = np.cumsum(counts)
        t = int(ends[-1])
        first = ends - counts
        row_of_token = np.repeat(np.arange(n), counts)
        positions = np.arange(t) - first[row_of_token] + starts[row_of_token]
        ids = np.fromiter(
            chain.from_iterable(x.seq.token_ids[x.start : x.start + x.num_new_tokens]
                                for x in scheduled),
            dtype=np.int32, count=t,
        )
        ctx = starts + counts
        w = int((ctx.max() + bs - 1) // bs)
        tables = self.tables.gather(scheduled)[:, :w]
        slots = tables[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        samples = np.array([i for i, x in enumerate(scheduled) if x.samples], dtype=np.int64)
        sample_rows = ends[samples] - 1 if len(samples) else samples
        nd = int(np.count_nonzero(counts == 1)) if n else 0
        if nd and not (counts[:nd] == 1).all():
            raise AssertionError("decodes must come before prefill chunks")
        sections = [ids, positions, slots, sample_rows, ctx[:nd], ctx[nd:],
                    np.concatenate(([0], np.cumsum(counts[nd:]))), tables.reshape(-1)]
        views = self._pack(sections)
        v_ids, v_pos, v_slots, v_sample, v_dlens, v_plens, v_qstart, v_tables = views
        v_tables = v_tables.view(n, w)
        prefills = [
            PrefillChunk(i - nd, int(first[i]), int(counts[i]), int(ctx[i]))
            for i in range(nd, n)
        ]
        meta = AttentionMetadata(
            slot_mapping=v_slots,
            num_decodes=nd,
            decode_block_tables=v_tables[:nd] if nd else None,
            decode_seq_lens=v_dlens if nd else None,
            decode_max_seq_len=int(ctx[:nd].max()) if nd else 0,
            prefills=prefills,
            prefill_query_start=v_qstart if prefills else None,
            prefill_seq_lens=v_plens if prefills else None,
            prefill_block_tables=v_tables[nd:] if prefills else None,
            prefill_max_query_len=int(counts[nd:].max()) if prefills else 0,
        )
        return StepBatch(v_ids, v_pos, meta, v_sample, t)

    def _pack(self, sections: list[np.ndarray]) -> list[torch.Tensor]:
        offsets, at = [], 0
        for sec in sections:
            self.host_np[at : at + len(sec)] = sec
            offsets.append((at, len(sec)))
            at += len(sec)
        self._upload(at)
        return [self.dev[o : o + k] for o, k in offsets]

    def _upload(self, count: int) -> None:
        if self.dev is not self.host:
            self.dev[:count].copy_(self.host[:count], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _wait_host(self) -> None:
        """The last step's copy has read the host buffer before it is written again."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None


class BlockTableRows:
    """Block tables kept as numpy rows across steps: a running sequence's table only
    grows, so a step writes just its new entries and gathers the batch's rows at once
    (instead of converting every table from its Python list every step).

    A row belongs to (sequence, number of preemptions): a preempted sequence comes
    back with other blocks. Rows are never freed one by one; when all are taken the
    map starts over (a finished sequence's row is then reused)."""

    def __init__(self, capacity: int, max_blocks: int) -> None:
        self.rows = np.zeros((capacity, max_blocks), dtype=np.int32)
        self._row_of: dict[tuple[int, int], list[int]] = {}  # key -> [row, entries filled]

    def gather(self, scheduled: list[ScheduledSeq]) -> np.ndarray:
        """[len(scheduled), max_blocks] block tables of the batch (a copy)."""
        if len(self._row_of) + len(scheduled) > len(self.rows):
            self._row_of.clear()
        index = np.empty(len(scheduled), dtype=np.int64)
        for i, x in enumerate(scheduled):
            seq = x.seq
            table = seq.block_table
            entry = self._row_of.get((seq.seq_id, seq.num_preemptions))
            if entry is None:
                entry = self._row_of[(seq.seq_id, seq.num_preemptions)] = [len(self._row_of), 0]
            row, filled = entry
            if filled != len(table):
                start = filled if filled < len(table) else 0
                self.rows[row, start : len(table)] = table[start:]
                entry[1] = len(table)
            index[i] = row
        return self.rows[index]
