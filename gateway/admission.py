"""Admission control: at most ``max_inflight`` requests served at once, at most
``max_queue`` waiting for a slot, the rest refused with a retry hint.

Waiting requests are ordered by priority class (higher first), then by arrival
(``ordering="priority"``, the default), or by deadline within a class
(``"edf"``), or by arrival only (``"fcfs"``); with ``aging_s`` a waiter's class
rises by one per ``aging_s`` seconds waited, so no class starves (see
:mod:`gateway.queue_order`). When the queue is full, a request of a higher class
that sorts ahead of the last waiter pushes it out (that waiter is refused as if it
had arrived to a full queue). A freed slot goes straight to the
head of the queue, so a slot is never free while someone waits.

Usage, from any thread::

    with admission.slot(priority, cancelled=event) as ticket:   # blocks until admitted
        serve(...)

``slot`` raises :class:`AdmissionRejected` (answer RESOURCE_EXHAUSTED with
``err.message`` and ``err.trailing_metadata()``) or :class:`AdmissionCancelled`
(the client went away). The slot is given back on every way out.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from gateway.queue_order import QueueKey, QueueOrder
from splitserve.v1 import common_pb2

PRIORITY_NORMAL = common_pb2.PRIORITY_CLASS_NORMAL
MIN_RETRY_S = 0.05
MAX_RETRY_S = 300.0
CANCEL_POLL_S = 0.05

WAITING = "waiting"
ADMITTED = "admitted"
RELEASED = "released"
CANCELLED = "cancelled"
REJECTED = "rejected"


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a ``threading.Event`` the server sets when the
    client goes away (e.g. ``context.add_callback(event.set)``)."""

    def is_set(self) -> bool: ...


class AdmissionRejected(Exception):
    """No room: answer RESOURCE_EXHAUSTED with :attr:`message` and
    :meth:`trailing_metadata` (``retry-after-ms``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        return max(1, round(self.retry_after_s * 1000))

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(self.retry_after_ms)),)


class AdmissionCancelled(Exception):
    """The waiter was cancelled (client gone) before it got a slot."""


class Ticket:
    """One request's place: waiting, then admitted, then released (or cancelled /
    rejected). State changes happen under the controller's lock."""

    __slots__ = (
        "priority",
        "deadline",
        "seq",
        "enqueued_at",
        "admitted_at",
        "released_at",
        "state",
        "rejection",
        "_key",
        "_event",
        "_waker",
    )

    def __init__(self, priority: int, deadline: float | None, seq: int, now: float) -> None:
        self.priority = priority
        self.deadline = deadline  # absolute, on the controller's clock; None -> none
        self.seq = seq
        self.enqueued_at = now
        self.admitted_at: float | None = None
        self.released_at: float | None = None
        self.state = WAITING
        self.rejection: AdmissionRejected | None = None
        self._key: QueueKey = ()
        self._event = threading.Event()  # set when the state leaves WAITING
        self._waker: Callable[[], None] | None = None  # called then too (wait_async)

    def _leave_waiting(self) -> None:
        self._event.set()
        if self._waker is not None:
            self._waker()

    @property
    def admitted(self) -> bool:
        return self.state == ADMITTED

    @property
    def queue_seconds(self) -> float | None:
        """Time spent waiting for the slot (None while still waiting)."""
        return None if self.admitted_at is None else self.admitted_at - self.enqueued_at

    def __repr__(self) -> str:
        return f"Ticket(#{self.seq}, priority={self.priority}, {self.state})"


@dataclass(frozen=True)
class AdmissionStats:
    inflight: int
    waiting: int
    max_inflight: int
    max_queue: int
    admitted_total: int
    rejected_total: int
    cancelled_total: int  # gave up their place before being served
    shed_total: int  # waiters pushed out by a higher class
    mean_service_s: float


class AdmissionController:
    def __init__(
        self,
        max_inflight: int,
        max_queue: int,
        *,
        ordering: str = "priority",
        aging_s: float = 0.0,
        default_service_s: float = 1.0,
        history: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.order = QueueOrder(ordering, aging_s)
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self._default_service_s = default_service_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._waiting: list[tuple[QueueKey, Ticket]] = []  # sorted, head first
        self._inflight = 0
        self._service_s: deque[float] = deque(maxlen=history)
        self._admitted_total = 0
        self._rejected_total = 0
        self._cancelled_total = 0
        self._shed_total = 0

    # -- the blocking interface ------------------------------------------------------------

    @contextmanager
    def slot(
        self,
        priority: int = PRIORITY_NORMAL,
        cancelled: CancelFlag | None = None,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Iterator[Ticket]:
        """Blocks until admitted, yields the ticket, gives the slot back on exit.
        ``deadline``: seconds from now the answer is wanted by (for ``edf``);
        ``timeout``: the longest wait in the queue (then AdmissionRejected)."""
        ticket = self.try_admit(priority, deadline=deadline)
        try:
            self.wait(ticket, cancelled, timeout=timeout)
            yield ticket
        finally:
            self.release(ticket)

    def wait(
        self, ticket: Ticket, cancelled: CancelFlag | None = None, *, timeout: float | None = None
    ) -> Ticket:
        """Blocks until ``ticket`` is admitted. Raises AdmissionCancelled when
        ``cancelled`` is set (or :meth:`cancel` was called), AdmissionRejected when it
        was pushed out of the queue or waited ``timeout`` seconds; either way its
        place is given up."""
        end = None if timeout is None else time.monotonic() + timeout
        while not ticket._event.is_set():
            if cancelled is not None and cancelled.is_set():
                self.cancel(ticket)
                break
            step = CANCEL_POLL_S if cancelled is not None else None
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    with self._lock:
                        if ticket.state == WAITING:
                            self._remove(ticket, REJECTED)
                            self._rejected_total += 1
                            hint = self._retry_after_locked()
                            raise AdmissionRejected(
                                f"waited {timeout:g} s in the admission queue without "
                                f"getting a slot; retry in about {hint:.1f} s",
                                hint,
                            )
                    break
                step = left if step is None else min(step, left)
            ticket._event.wait(step)
        with self._lock:
            if ticket.state == ADMITTED and cancelled is not None and cancelled.is_set():
                self._release_locked(ticket, CANCELLED)  # admitted as the client left
                self._cancelled_total += 1
            state, rejection = ticket.state, ticket.rejection
        if state == ADMITTED:
            return ticket
        if state == REJECTED and rejection is not None:
            raise rejection
        raise AdmissionCancelled("the request was cancelled while waiting for admission")

    async def wait_async(self, ticket: Ticket) -> Ticket:
        """Awaits admission of ``ticket`` on the running event loop, without a thread or
        polling. Cancelling the awaiting task leaves the ticket to the caller's release.
        Raises AdmissionRejected (pushed out) or AdmissionCancelled like :meth:`wait`."""
        loop = asyncio.get_running_loop()
        admitted = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: admitted.done() or admitted.set_result(None))

        with self._lock:
            if ticket.state == WAITING:
                ticket._waker = wake
            else:
                admitted.set_result(None)
        await admitted
        if ticket.state == ADMITTED:
            return ticket
        if ticket.state == REJECTED and ticket.rejection is not None:
            raise ticket.rejection
        raise AdmissionCancelled("the request was cancelled while waiting for admission")

    # -- the non-blocking interface ----------------------------------------------------------

    def try_admit(
        self, priority: int = PRIORITY_NORMAL, *, deadline: float | None = None
    ) -> Ticket:
        """Admits at once when a slot is free, else queues (the ticket is then WAITING:
        :meth:`wait` for it); raises AdmissionRejected when the queue is full."""
        if priority == common_pb2.PRIORITY_CLASS_UNSPECIFIED:
            priority = PRIORITY_NORMAL
        with self._lock:
            now = self._clock()
            ticket = Ticket(
                priority, None if deadline is None else now + deadline, next(self._seq), now
            )
            if self._inflight < self.max_inflight:
                self._admit_locked(ticket, now)
                return ticket
            ticket._key = self.order.key(priority, ticket.deadline, now, ticket.seq)
            if len(self._waiting) >= self.max_queue:
                victim = self._waiting[-1][1] if self._waiting else None
                if victim is None or not self._pushes_out(ticket, victim):
                    self._rejected_total += 1
                    raise self._rejection_locked()
                self._remove(victim, REJECTED)
                victim.rejection = self._rejection_locked(pushed_out=True)
                self._shed_total += 1
                self._rejected_total += 1
            bisect.insort(self._waiting, (ticket._key, ticket), key=lambda e: e[0])
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: a waiting ticket leaves the queue, an admitted one
        gives its slot back. Idempotent; safe from any thread."""
        with self._lock:
            if ticket.state == WAITING:
                self._remove(ticket, CANCELLED)
                self._cancelled_total += 1
            elif ticket.state == ADMITTED:
                self._release_locked(ticket, CANCELLED)

    def release(self, ticket: Ticket) -> None:
        """Gives the slot back (or the queue place, if not admitted yet). Idempotent."""
        with self._lock:
            if ticket.state == ADMITTED:
                self._release_locked(ticket, RELEASED)
            elif ticket.state == WAITING:
                self._remove(ticket, CANCELLED)
                self._cancelled_total += 1

    # -- introspection -----------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def retry_after_s(self) -> float:
        """Seconds a client refused now should wait before retrying."""
        with self._lock:
            return self._retry_after_locked()

    def stats(self) -> AdmissionStats:
        with self._lock:
            return AdmissionStats(
                inflight=self._inflight,
                waiting=len(self._waiting),
                max_inflight=self.max_inflight,
                max_queue=self.max_queue,
                admitted_total=self._admitted_total,
                rejected_total=self._rejected_total,
                cancelled_total=self._cancelled_total,
                shed_total=self._shed_total,
                mean_service_s=self._mean_service_locked(),
            )

    # -- internals (under the lock) ------------------------------------------------------

    @staticmethod
    def _pushes_out(newcomer: Ticket, last: Ticket) -> bool:
        """A full queue's last waiter gives way to a newcomer of a higher class that
        sorts ahead of it (with aging, a long waiter may sort ahead of a higher class)."""
        return last.priority < newcomer.priority and newcomer._key < last._key

    def _admit_locked(self, t: Ticket, now: float) -> None:
        t.state = ADMITTED
        t.admitted_at = now
        self._inflight += 1
        self._admitted_total += 1
        t._leave_waiting()

    def _remove(self, t: Ticket, state: str) -> None:
        i = bisect.bisect_left(self._waiting, t._key, key=lambda e: e[0])
        if i < len(self._waiting) and self._waiting[i][1] is t:
            del self._waiting[i]
        t.state = state
        t._leave_waiting()

    def _release_locked(self, t: Ticket, state: str) -> None:
        now = self._clock()
        t.state = state
        t.released_at = now
        if t.admitted_at is not None:
            self._service_s.append(max(0.0, now - t.admitted_at))
        self._inflight -= 1
        while self._waiting and self._inflight < self.max_inflight:
            _, head = self._waiting.pop(0)
            self._admit_locked(head, now)

    def _mean_service_locked(self) -> float:
        if not self._service_s:
            return self._default_service_s
        return sum(self._service_s) / len(self._service_s)

    def _retry_after_locked(self) -> float:
        # The queue drains max_inflight requests per mean service time.
        ahead = len(self._waiting) + 1
        est = self._mean_service_locked() * ahead / self.max_inflight
        return min(max(est, MIN_RETRY_S), MAX_RETRY_S)

    def _rejection_locked(self, pushed_out: bool = False) -> AdmissionRejected:
        hint = self._retry_after_locked()
        why = (
            "pushed out of the admission queue by higher-priority requests"
            if pushed_out
            else "server overloaded"
        )
        return AdmissionRejected(
            f"{why}: {self._inflight} requests in flight (max_inflight {self.max_inflight}) "
            f"and {len(self._waiting)} waiting (max_queue {self.max_queue}); "
            f"retry in about {hint:.1f} s",
            hint,
        )
