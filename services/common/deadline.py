"""A worker request's deadline: the sooner of its ``deadline_ms`` and the gRPC call's own.

When it passes the engine request is aborted (an entry on the process's one timer
thread, no polling) and the request's stream ends with ``DeadlineExceeded``, which the
worker answers ``DEADLINE_EXCEEDED``; the RPC's done-callback then releases the store
pins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from services.common.engine_loop import EngineStopped
from services.common.timers import TIMERS
from services.transfer.base import call_deadline

NO_DEADLINE_S = 1e6  # grpc reports a huge time_remaining() for calls without a deadline


class DeadlineExceeded(Exception):
    """The request ran past its deadline."""


@dataclass
class RequestDeadline:
    at: float | None  # time.monotonic() when the request must be over; None: never
    budget_ms: float = 0.0
    expired: bool = False

    @classmethod
    def of(cls, deadline_ms: int, context: grpc.ServicerContext) -> RequestDeadline:
        limits = [deadline_ms / 1000] if deadline_ms else []
        remaining = context.time_remaining()
        if remaining is not None and remaining < NO_DEADLINE_S:
            limits.append(remaining)
        if not limits:
            return cls(None)
        budget = min(limits)
        return cls(time.monotonic() + budget, budget * 1000)

    def remaining_s(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def check(self) -> None:
        if self.at is not None and time.monotonic() >= self.at:
            self.expired = True
            raise self.error()

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request's deadline of {self.budget_ms:.0f} ms passed "
                                "before it finished; raise deadline_ms or ask for fewer tokens")

    @contextmanager
    def store_calls(self) -> Iterator[None]:
        """Store calls inside end by the deadline; one cut short by it (its own
        DEADLINE_EXCEEDED) is this request's deadline passing, not a store failure."""
        try:
            with call_deadline(self.remaining_s()):
                yield
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED or self.at is None or \
                    time.monotonic() < self.at:
                raise
            self.expired = True
            raise self.error() from None

    @contextmanager
    def enforced(self, abort: Callable[[], None]) -> Iterator[None]:
        """Calls ``abort`` (of the engine request) when the deadline passes; the engine
        stream that ends then raises DeadlineExceeded instead of EngineStopped."""
        if self.at is None:
            yield
            return

        def expire() -> None:
            self.expired = True
            abort()

        timer = TIMERS.call_at(self.at, expire)
        try:
            yield
        except EngineStopped:
            if self.expired:
                raise self.error() from None
            raise
        finally:
            TIMERS.cancel(timer)
