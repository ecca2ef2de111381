"""Preemption: a request of a higher priority class that finds every decode worker
full takes the place of a lower-priority one, which pauses and resumes later.

A decode worker saves every full block of an answer into the store as it fills
(see services/decode), so a preempted request loses at most its partial last
block: the gateway just stops its decode call (the worker frees the sequence) and
later resumes it on any decode worker from the tokens streamed so far, like a
migration. The client's stream only pauses. Policy (``gateway.preemption``): a class
preempts only classes at least ``min_class_gap`` below it and not ``protected``; a
request is preempted at most ``max_per_request`` times; ``enabled: false`` turns it off
(a higher class then waits for a place like anyone else).

Whether a worker is full is judged from its last load report corrected by what this
gateway did since: a request that ended here frees its place at once, not at the
worker's next report, so a paused request resumes as soon as the place is free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gateway.router import DECODE, WorkerInfo
from services.common.logging import get_logger
from services.common.settings import PreemptionSettings

log = get_logger("gateway")
RESUME_POLL_S = 0.05


@dataclass(eq=False)
class Decoding:
    """A request decoding on a worker, as the preemptor sees it."""

    request_id: str
    priority: int
    preempt: Callable[[], None]  # stops its decode call; its flow then pauses it
    worker_id: str = ""
    preemptions: int = 0
    waiting: bool = False  # asking for a place (a new arrival or a paused request)
    placed_order: int = 0  # when it was last placed (larger: later)


@dataclass
class Preemptor:
    workers: Callable[[str], list[WorkerInfo]]  # the pool's workers of a role
    policy: PreemptionSettings = field(default_factory=PreemptionSettings)
    _placed: dict[str, set[Decoding]] = field(default_factory=dict)  # worker id -> requests
    _asking: set[Decoding] = field(default_factory=set)
    # worker id -> load_seq of its report at each end of a request placed there since
    _ended: dict[str, list[int]] = field(default_factory=dict)
    _freed: asyncio.Event | None = None  # set when a place frees; a new one after
    _placements: int = 0

    def full(self, worker: WorkerInfo) -> bool:
        """No place for one more sequence: the batch is full (by what it reported, less
        what ended here since, and what this gateway sent it) or the engine already
        queues requests."""
        if not worker.healthy:
            return True
        ended = self._ended_since_report(worker)
        if worker.waiting > ended:
            return True
        ours = len(self._placed.get(worker.worker_id, ()))
        limit = worker.max_num_seqs
        return bool(limit) and max(worker.running - ended, ours) >= limit

    def _ended_since_report(self, worker: WorkerInfo) -> int:
        seqs = self._ended.get(worker.worker_id)
        if not seqs:
            return 0
        fresh = [s for s in seqs if s == worker.load_seq]  # a newer report counts them
        self._ended[worker.worker_id] = fresh
        return len(fresh)

    def all_full(self) -> bool:
        return all(self.full(w) for w in self.workers(DECODE))

    @contextmanager
    def asking(self, d: Decoding) -> Iterator[None]:
        """``d`` looks for a place: lower-priority requests do not take it back."""
        d.waiting = True
        self._asking.add(d)
        try:
            yield
        finally:
            d.waiting = False
            self._asking.discard(d)

    def make_room(self, d: Decoding) -> bool:
        """If every decode worker is full, preempt the lowest-priority, latest placed
        request below ``d``'s class. True when one was preempted."""
        if not self.policy.enabled or not self.all_full():
            return False
        victims = [v for placed in self._placed.values() for v in placed
                   if self.may_preempt(d, v)]
        if not victims:
            return False
        # the lowest class; within it the latest placed, which has computed the least
        victim = min(victims, key=lambda v: (v.priority, -v.placed_order))
        victim.preemptions += 1
        log.info("preempting", request_id=victim.request_id, priority=victim.priority,
                 for_request=d.request_id, for_priority=d.priority)
        victim.preempt()
        return True

    def may_preempt(self, d: Decoding, victim: Decoding) -> bool:
        """The policy: may ``d`` take ``victim``'s place?"""
        p = self.policy
        return (p.enabled and victim.preemptions < p.max_per_request
                and d.priority - victim.priority >= p.min_class_gap
                and victim.priority not in p.protected_classes())

    async def wait_for_room(self, d: Decoding, timeout_s: float) -> None:
        """A paused request waits until a decode worker has a place and no request of
        a higher class is still asking for one (or its time runs out)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        with self.asking(d):
            while loop.time() < end and (self.all_full() or self._higher_asking(d)):
                if self._freed is None:
                    self._freed = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), RESUME_POLL_S)

    def _higher_asking(self, d: Decoding) -> bool:
        return any(o.priority > d.priority for o in self._asking if o is not d)

    @contextmanager
    def placed(self, d: Decoding, worker: WorkerInfo) -> Iterator[None]:
        """``d`` is decoding on ``worker`` for the duration."""
        d.worker_id = worker.worker_id
        self._placements += 1
        d.placed_order = self._placements
        self._placed.setdefault(worker.worker_id, set()).add(d)
        placed_at = worker.load_seq
        try:
            yield
        finally:
            self._placed.get(worker.worker_id, set()).discard(d)
            if worker.load_seq != placed_at:  # a report counted it: correct that report
                self._ended.setdefault(worker.worker_id, []).append(worker.load_seq)
            if self._freed is not None:  # wake the paused requests now
                self._freed.set()
                self._freed = None
