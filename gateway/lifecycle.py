"""One request's life in the gateway: its ids, owner, phase, deadline, cancellation
and cleanup, in one object.

Every way a request can be stopped from outside its own task (``Abort``, the
deadline, a worker found dead, shutdown) goes through :meth:`RequestLifecycle.cancel`,
which records why once and runs the cancel hooks (the serving task registers its
own ``Task.cancel``): nothing polls. Whatever the request holds (admission ticket,
table entry, store pins, worker bookkeeping) is registered with
:meth:`RequestLifecycle.on_release` and given back by :meth:`RequestLifecycle.release`,
exactly once, on every way out.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from gateway.admission import Ticket
from services.common.logging import get_logger

log = get_logger("gateway")


class Phase(enum.Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODE = "decode"
    MIGRATING = "migrating"  # its worker died: moving to another, KV from the store
    PREEMPTED = "preempted"  # paused for a higher class; resumes from the store
    FINISHED = "finished"


@dataclass(frozen=True)
class StopReason:
    """Why a request was stopped from outside: the status its client gets."""

    code: grpc.StatusCode
    message: str


class RequestLifecycle:
    def __init__(self, public_id: str, owner: str, deadline_s: float,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.internal_id = uuid.uuid4().hex  # what workers and the store know it by
        self.public_id = public_id or self.internal_id
        self.owner = owner
        self.phase = Phase.RECEIVED
        self.arrival = self.loop.time()
        self.deadline = self.arrival + deadline_s
        self.stop: StopReason | None = None
        self.ticket: Ticket | None = None  # its admission place, once it has one
        self._hooks: list[Callable[[], object]] = []
        self._cleanups: list[Callable[[], object]] = []
        self._pending: list[asyncio.Future[object]] = []  # cleanups still running
        self._released = False
        self._timer = self.loop.call_at(
            self.deadline, self.cancel, grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request's deadline of {deadline_s * 1000:.0f} ms passed")

    # -- time ---------------------------------------------------------------------------

    def remaining_s(self) -> float:
        """Seconds left until the deadline (>= 0): the timeout of every downstream call."""
        return max(0.0, self.deadline - self.loop.time())

    def remaining_ms(self) -> int:
        """The deadline as the workers' ``deadline_ms`` field: at least 1 (0 means none)."""
        return max(1, int(self.remaining_s() * 1000))

    def elapsed_s(self) -> float:
        return self.loop.time() - self.arrival

    # -- cancellation ---------------------------------------------------------------------

    def cancel(self, code: grpc.StatusCode, message: str) -> None:
        """Stops the request with ``code``; the first reason wins, later calls do nothing."""
        if self.stop is not None or self._released:
            return
        self.stop = StopReason(code, message)
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_cancel(self, hook: Callable[[], object]) -> None:
        if self.stop is not None:
            hook()
        else:
            self._hooks.append(hook)

    # -- cleanup --------------------------------------------------------------------------

    def on_release(self, cleanup: Callable[[], object]) -> None:
        """Runs ``cleanup`` at :meth:`release` (at once when already released). A cleanup
        that returns a task or future (an RPC) is awaited by :meth:`wait_released`."""
        if self._released:
            cleanup()
        else:
            self._cleanups.append(cleanup)

    def release(self) -> None:
        """Gives back everything the request holds, last registered first; idempotent."""
        if self._released:
            return
        self._released = True
        self.phase = Phase.FINISHED
        self._timer.cancel()
        self._hooks.clear()
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                result = cleanup()
            except Exception as e:  # one failed cleanup must not skip the others
                log.error("cleanup_failed", request_id=self.public_id, error=repr(e))
                continue
            if isinstance(result, asyncio.Future):
                self._pending.append(result)

    async def wait_released(self) -> None:
        """Waits for the cleanups still running (store releases), so that the client hears
        the end only once everything is given back; a second cancel does not stop them."""
        if self._pending:
            await asyncio.shield(asyncio.gather(*self._pending, return_exceptions=True))

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return (f"RequestLifecycle({self.public_id!r}, owner={self.owner!r}, "
                f"{self.phase.value}, stop={self.stop})")
