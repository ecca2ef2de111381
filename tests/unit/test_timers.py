"""The timer thread: functions run at their times, in order; cancelled ones never run;
the heap does not keep what was cancelled."""

from __future__ import annotations

import threading
import time

from services.common.timers import Timers


def test_due_functions_run_in_time_order_and_cancelled_ones_never() -> None:
    timers = Timers()
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    timers.call_at(now + 0.15, lambda: (ran.append("late"), done.set()))
    timers.call_at(now + 0.05, lambda: ran.append("early"))
    dropped = timers.call_at(now + 0.10, lambda: ran.append("cancelled"))
    timers.call_at(now - 1.0, lambda: ran.append("past"))  # due at once
    timers.cancel(dropped)
    timers.cancel(dropped)  # twice: no harm
    assert done.wait(5)
    assert ran == ["past", "early", "late"]
    assert len(timers) == 0


def test_cancelled_entries_do_not_pile_up() -> None:
    timers = Timers()
    far = time.monotonic() + 3600
    entries = [timers.call_at(far, lambda: None) for _ in range(1000)]
    for e in entries[:-1]:
        timers.cancel(e)
    assert len(timers) == 1
    assert len(timers._heap) < 200  # rebuilt as the cancelled outgrew the live
