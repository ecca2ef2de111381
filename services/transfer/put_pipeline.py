"""A large device put in chunks whose RPCs overlap the copies of the others.

When the store's gpu tier is full of pinned blocks, a device put *spills*: its blocks
cross the link into the store's host arena by DMA, ~10 ms for 512 MiB on the H200. As
one two-phase put, its two RPCs run before and after the copies (BeginPut, which makes
room, ~3 ms for 292 blocks on that host's Python; CommitPut ~2 ms), and the put
reached 34 GB/s against the link's 55. In chunks, chunk i's copies cross the link while
chunk i+1 is begun and chunk i-1 committed on helper threads: only the first chunk's
BeginPut and the last one's CommitPut stay outside the copies.

A chunk the store gave a landing pad (kvstore.landing) is committed as soon as its
copies and its landing token are enqueued: the store waits for the token, so the last
chunk's CommitPut travels while its copies cross, not after. Without a pad, the
CommitPut waits for the chunk's copies to land.

A chunk's slots are never freed under a copy still in flight: a failure waits for the
stream before it aborts the chunks begun and not committed. Chunks committed before a
failure stay stored (pinned by their owner, like any block put for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from services.transfer.arena_ops import abort_put, commit_put
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

CHUNK_BYTES = 128 << 20  # a chunk's copies (~2.4 ms at 55 GB/s) outlast its RPCs
BEGINS_AHEAD = 1  # chunks begun ahead of the one whose copies are being enqueued

Begun = tuple[kvstore_pb2.BeginPutResponse, list[int]]


class PutHelpers(NamedTuple):
    """The threads of pipelined puts: the next chunk's BeginPut on one, and the
    CommitPuts, each waiting for its chunk's copies to land (here or in the store), on
    others (a BeginPut queued behind such a wait would stall the copies)."""

    begins: ThreadPoolExecutor
    commits: ThreadPoolExecutor

    @classmethod
    def start(cls, name: str) -> PutHelpers:
        return cls(ThreadPoolExecutor(BEGINS_AHEAD, thread_name_prefix=f"{name}-begin"),
                   ThreadPoolExecutor(4, thread_name_prefix=f"{name}-commit"))

    def shutdown(self) -> None:
        self.begins.shutdown()
        self.commits.shutdown()


def chunks(count: int, nbytes: int) -> list[range]:
    """``count`` blocks of ``nbytes`` in runs of about CHUNK_BYTES; the last is half as
    long, so the CommitPut left after the copies is a short one. One run where that
    makes fewer than two."""
    per = max(1, CHUNK_BYTES // max(1, nbytes))
    if count < 2 * per:
        return [range(count)]
    pieces = round(count / per)
    unit = count / (pieces - 0.5)  # whole runs, and half a one
    starts = [round(i * unit) for i in range(pieces)] + [count]
    return [range(a, b) for a, b in zip(starts, starts[1:], strict=False)]


def pipelined_put(stub: kvstore_pb2_grpc.KVStoreStub, helpers: PutHelpers,
                  pieces: Sequence[range], begin: Callable[[range], Begun],
                  write: Callable[[kvstore_pb2.BeginPutResponse, list[int], range],
                                  list[int]],
                  stream: Any, timeout_s: float | None,
                  meanwhile: Callable[[], object] | None = None
                  ) -> list[kvstore_pb2.CommitPutResponse]:
    """Puts ``pieces`` of a put: ``begin(piece)`` (on helper threads, BEGINS_AHEAD pieces ahead),
    ``write(answer, offsets, piece)`` (enqueues the piece's copies on ``stream``, and
    the landing token where the answer has a pad, and returns its checksums), then
    CommitPut (on another helper thread; once the copies landed, for a piece without a
    pad) -> each piece's CommitPut answer. ``meanwhile`` runs while the first piece
    is begun. Raises the first failure, after every piece is committed or aborted and
    no copy is left in flight."""
    ahead: dict[int, Future] = {i: helpers.begins.submit(begin, pieces[i])
                                for i in range(min(BEGINS_AHEAD, len(pieces)))}
    commits: list[Future] = []
    writing = None  # the begun piece whose copies are being enqueued
    try:
        if meanwhile is not None:
            meanwhile()
        for i, piece in enumerate(pieces):
            writing, offsets = ahead.pop(i).result()
            if (nxt := i + BEGINS_AHEAD) < len(pieces):
                ahead[nxt] = helpers.begins.submit(begin, pieces[nxt])
            sums = write(writing, offsets, piece)
            landed = stream.record_event()
            commits.append(helpers.commits.submit(_commit_landed, stub, writing, sums,
                                                  landed, timeout_s))
            writing = None
    except BaseException:
        stream.synchronize()  # nothing may still land in the slots the aborts free
        if writing is not None:
            abort_put(stub, writing.put_id)
        for f in ahead.values():
            with contextlib.suppress(Exception):
                abort_put(stub, f.result()[0].put_id)
        _results(commits)
        raise
    return _results(commits)  # a failed commit waited for its copies before its abort


def _commit_landed(stub: kvstore_pb2_grpc.KVStoreStub, begun: kvstore_pb2.BeginPutResponse,
                   sums: list[int], landed: Any, timeout_s: float | None
                   ) -> kvstore_pb2.CommitPutResponse:
    if not begun.landing_offset:
        landed.synchronize()
    return commit_put(stub, begun, sums, timeout_s, landed=landed.synchronize)


def _results(commits: list[Future]) -> list[kvstore_pb2.CommitPutResponse]:
    """Every commit's answer, after all of them ended; raises the first failure."""
    answers, failures = [], []
    for f in commits:
        try:
            answers.append(f.result())
        except Exception as e:  # noqa: BLE001, PERF203 (each commit is awaited)
            failures.append(e)
    if failures:
        raise failures[0]
    return answers
