"""A step's integer inputs, built with numpy in one persistent (pinned) host buffer
and moved to the device in one copy.

Three layouts share the buffers:

* ``general`` (any batch): sections packed one after another, sized by the step;
* ``decode`` (one token per sequence, CUDA-graph replay): every section at a
  fixed offset for ``max_seqs`` rows, so a graph captured on views of the device
  buffer reads each step's values. Rows past the batch are padding: slot -1
  (nothing written) and length 0 (nothing read);
* ``chunks`` (a small step of any kind, CUDA-graph replay): up to
  ``chunk_tokens`` tokens of up to ``chunk_seqs`` sequences, every sequence a
  chunk (a decode is a chunk of one token); padding sequences have no tokens.

Every section starts at a multiple of ``ALIGN`` elements: Triton specialises a
kernel on whether a pointer is 16-byte aligned, and sections at odd offsets
would compile new variants in the middle of serving.

Block tables are int32 rows of ``max_blocks`` entries; only the first
``ceil(context / block_size)`` of a row are meaningful.

Decodes whose input token the step launched before samples (async scheduling)
get it on the device: ``feed_from_device`` names the rows and where the tokens
are, the row indices travel in a head section before the layouts in the same
copy, and one gather/scatter writes the tokens into the ids section. Those rows
come first (decodes lead every layout), so a row is also its token's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from services.engine.attention import AttentionMetadata, PrefillChunk
from services.engine.scheduler import ScheduledSeq

ALIGN = 16  # int32 elements: 64 bytes


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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
        device: torch.device, chunk_tokens: int = 0, chunk_seqs: int = 0,
    ) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.max_blocks, self.block_size = max_blocks, block_size
        self.chunk_tokens, self.chunk_seqs = chunk_tokens, chunk_seqs
        self.device = device
        self.seq_stride = aligned(max_seqs)  # decode layout: one section per stride
        general = 3 * max_tokens + 4 * max_seqs + 1 + max_seqs * max_blocks + 9 * ALIGN
        decode = 4 * self.seq_stride + max_seqs * max_blocks
        size = max(general, decode, self._chunk_offsets()[-1])
        cuda = device.type == "cuda"
        # rows fed from the device: [dst rows, src rows], int64 (index ops want it)
        self.head = 4 * self.seq_stride
        self._raw_host = torch.zeros(self.head + size, dtype=torch.int32, pin_memory=cuda)
        self._raw_dev = (torch.zeros(self.head + size, dtype=torch.int32, device=device)
                         if cuda else self._raw_host)
        self.host = self._raw_host[self.head :]
        self.dev = self._raw_dev[self.head :] if cuda else self.host
        self.host_np = self.host.numpy()
        self._head_np = self._raw_host[: self.head].numpy().view(np.int64)
        self._head_dev = self._raw_dev[: self.head].view(torch.int64)
        self._copied: torch.cuda.Event | None = None
        self._feed: tuple[list[int], list[int], torch.Tensor] | None = None
        self.tables = BlockTableRows(4 * max_seqs, max_blocks)

    # ---- the fixed decode layout ----
    def decode_views(self, rows: int) -> StepBatch:
        """Device views of the decode layout for a batch of ``rows`` (graph capture)."""
        s, w = self.seq_stride, self.max_blocks
        d = self.dev
        tables = d[4 * s : 4 * s + self.max_seqs * w].view(self.max_seqs, w)[:rows]
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
        n, s, w, bs = len(scheduled), self.seq_stride, self.max_blocks, self.block_size
        h = self.host_np
        self._wait_host()
        if n == 0:
            h[:rows] = h[s : s + rows] = h[3 * s : 3 * s + rows] = 0
            h[2 * s : 2 * s + rows] = -1
            self._upload(4 * s)
            return 0
        pos = np.fromiter((x.start for x in scheduled), dtype=np.int64, count=n)
        h[:n] = np.fromiter(
            (0 if x.input_from_device else x.seq.token_ids[x.start] for x in scheduled),
            np.int32, count=n)
        h[s : s + n] = pos
        h[3 * s : 3 * s + n] = pos + 1
        h[n:rows] = 0
        h[s + n : s + rows] = 0
        h[3 * s + n : 3 * s + rows] = 0
        h[2 * s + n : 2 * s + rows] = -1
        tables = h[4 * s : 4 * s + self.max_seqs * w].reshape(self.max_seqs, w)
        tables[:n] = self.tables.gather(scheduled)
        blocks = tables[np.arange(n), pos // bs].astype(np.int64)
        h[2 * s : 2 * s + n] = blocks * bs + pos % bs
        self._upload(4 * s + n * w)
        return int(pos.max()) + 1

    # ---- the general layout ----
    def _flatten(self, scheduled: list[ScheduledSeq]) -> _Flat:
        n, bs = len(scheduled), self.block_size
        starts = np.fromiter((x.start for x in scheduled), dtype=np.int64, count=n)
        counts = np.fromiter((x.num_new_tokens for x in scheduled), dtype=np.int64, count=n)
        ends = np.cumsum(counts)
        t = int(ends[-1])
        first = ends - counts
        row_of_token = np.repeat(np.arange(n), counts)
        positions = np.arange(t) - first[row_of_token] + starts[row_of_token]
        ids = np.fromiter(chain.from_iterable(map(_host_ids, scheduled)), np.int32, count=t)
        tables = self.tables.gather(scheduled)
        slots = tables[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        samples = np.array([i for i, x in enumerate(scheduled) if x.samples], dtype=np.int64)
        sample_rows = ends[samples] - 1 if len(samples) else samples
        return _Flat(t, ids, positions, slots, counts, first, starts + counts, tables,
                     sample_rows)

    def fill_general(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        """Any batch, decodes first then prefill chunks."""
        n, bs = len(scheduled), self.block_size
        self._wait_host()
        f = self._flatten(scheduled)
        counts, first, ctx = f.counts, f.first, f.ctx
        w = int((ctx.max() + bs - 1) // bs)
        tables = f.tables[:, :w]
        nd = int(np.count_nonzero(counts == 1)) if n else 0
        if nd and not (counts[:nd] == 1).all():
            raise AssertionError("decodes must come before prefill chunks")
        # decode and prefill tables are separate sections: a slice of one would start
        # unaligned (see ALIGN)
        sections = [f.ids, f.positions, f.slots, f.sample_rows, ctx[:nd], ctx[nd:],
                    np.concatenate(([0], np.cumsum(counts[nd:]))),
                    tables[:nd].reshape(-1), tables[nd:].reshape(-1)]
        views = self._pack(sections)
        v_ids, v_pos, v_slots, v_sample, v_dlens, v_plens, v_qstart, v_dtables, v_ptables = views
        prefills = [
            PrefillChunk(i - nd, int(first[i]), int(counts[i]), int(ctx[i]))
            for i in range(nd, n)
        ]
        meta = AttentionMetadata(
            slot_mapping=v_slots,
            num_decodes=nd,
            decode_block_tables=v_dtables.view(nd, w) if nd else None,
            decode_seq_lens=v_dlens if nd else None,
            decode_max_seq_len=int(ctx[:nd].max()) if nd else 0,
            prefills=prefills,
            prefill_query_start=v_qstart if prefills else None,
            prefill_seq_lens=v_plens if prefills else None,
            prefill_block_tables=v_ptables.view(n - nd, w) if prefills else None,
            prefill_max_query_len=int(counts[nd:].max()) if prefills else 0,
        )
        return StepBatch(v_ids, v_pos, meta, v_sample, f.num_tokens)

    # ---- the fixed chunks layout ----
    def _chunk_offsets(self) -> list[int]:
        """Starts of ids, positions, slots, query starts, lengths, tables, sample rows;
        then the end."""
        t, p = aligned(self.chunk_tokens), aligned(self.chunk_seqs + 1)
        tables = 3 * t + 2 * p
        rows = tables + aligned(self.chunk_seqs * self.max_blocks)
        return [0, t, 2 * t, 3 * t, 3 * t + p, tables, rows, rows + aligned(self.chunk_seqs)]

    def chunk_views(self, tokens: int) -> StepBatch:
        """Device views of the chunks layout for ``tokens`` tokens (graph capture);
        the sample rows are filled by ``fill_chunks``."""
        o, d, s = self._chunk_offsets(), self.dev, self.chunk_seqs
        meta = AttentionMetadata(
            slot_mapping=d[o[2] : o[2] + tokens],
            prefills=[PrefillChunk(0, 0, tokens, tokens)],  # host facts are not read
            prefill_query_start=d[o[3] : o[3] + s + 1],
            prefill_seq_lens=d[o[4] : o[4] + s],
            prefill_block_tables=d[o[5] : o[5] + s * self.max_blocks].view(s, self.max_blocks),
            prefill_max_query_len=tokens,
        )
        return StepBatch(d[:tokens], d[o[1] : o[1] + tokens], meta, d[o[6] : o[6]], tokens)

    def fill_chunks(self, scheduled: list[ScheduledSeq], tokens: int) -> torch.Tensor:
        """Write a batch of at most ``chunk_seqs`` sequences and ``tokens`` tokens into
        the chunks layout, padded; copy it to the device. Returns the device rows of
        the hidden states that sample."""
        o, h, s, w = self._chunk_offsets(), self.host_np, self.chunk_seqs, self.max_blocks
        self._wait_host()
        if not scheduled:
            h[: o[1] + tokens] = 0
            h[o[2] : o[2] + tokens] = -1
            h[o[3] : o[5]] = 0
            self._upload(o[5])
            return self.dev[o[6] : o[6]]
        f, n = self._flatten(scheduled), len(scheduled)
        t = f.num_tokens
        for at, values, pad in ((0, f.ids, 0), (o[1], f.positions, 0), (o[2], f.slots, -1)):
            h[at : at + t] = values
            h[at + t : at + tokens] = pad
        h[o[3]] = 0
        h[o[3] + 1 : o[3] + 1 + n] = np.cumsum(f.counts)
        h[o[3] + 1 + n : o[3] + 1 + s] = t  # padding sequences: no tokens
        h[o[4] : o[4] + n] = f.ctx
        h[o[4] + n : o[4] + s] = 0
        h[o[5] : o[5] + n * w] = f.tables.reshape(-1)
        k = len(f.sample_rows)
        h[o[6] : o[6] + k] = f.sample_rows
        self._upload(o[6] + k)
        return self.dev[o[6] : o[6] + k]

    def _pack(self, sections: list[np.ndarray]) -> list[torch.Tensor]:
        offsets, at = [], 0
        for sec in sections:
            self.host_np[at : at + len(sec)] = sec
            offsets.append((at, len(sec)))
            at = aligned(at + len(sec))
        self._upload(at)
        return [self.dev[o : o + k] for o, k in offsets]

    def feed_from_device(self, rows: list[int], src_rows: list[int], ids: torch.Tensor) -> None:
        """The next fill's input token of batch row ``rows[i]`` is ``ids[src_rows[i]]``
        (on the device, sampled by the step launched before)."""
        self._feed = (rows, src_rows, ids) if rows else None

    def _upload(self, count: int) -> None:
        feed, self._feed = self._feed, None
        start = self.head
        if feed is not None:
            rows, src, _ = feed
            k, start = len(rows), 0
            self._head_np[:k] = rows
            self._head_np[self.seq_stride : self.seq_stride + k] = src
        if self.dev is not self.host:
            end = self.head + count
            self._raw_dev[start:end].copy_(self._raw_host[start:end], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        if feed is not None:
            self._scatter(len(feed[0]), feed[2])

    def _scatter(self, k: int, ids: torch.Tensor) -> None:
        rows = self._head_dev[:k]
        src = self._head_dev[self.seq_stride : self.seq_stride + k]
        self.dev.index_copy_(0, rows, ids.index_select(0, src).to(torch.int32))

    def _wait_host(self) -> None:
        """The last step's copy has read the host buffer before it is written again."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None


def _host_ids(x: ScheduledSeq) -> list[int]:
    """The chunk's input tokens; a placeholder 0 for a token fed from the device."""
    if x.input_from_device:
        return [0]
    return x.seq.token_ids[x.start : x.start + x.num_new_tokens]


@dataclass
class _Flat:
    """A batch flattened token by token (host arrays)."""

    num_tokens: int
    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    counts: np.ndarray  # new tokens per sequence
    first: np.ndarray  # each sequence's first token in the batch
    ctx: np.ndarray  # context length after the step
    tables: np.ndarray  # [n, max_blocks]
    sample_rows: np.ndarray


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
