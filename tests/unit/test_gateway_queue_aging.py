"""Aging of the admission queue: no class starves behind a stream of higher classes."""

from __future__ import annotations

import pytest

from gateway.admission import AdmissionController, AdmissionRejected, Ticket
from gateway.bootstrap import queue_for
from gateway.queue_order import QueueOrder
from services.common.settings import GatewaySettings
from splitserve.v1 import common_pb2 as c

BATCH, NORMAL, HIGH, CRITICAL = (c.PRIORITY_CLASS_BATCH, c.PRIORITY_CLASS_NORMAL,
                                 c.PRIORITY_CLASS_HIGH, c.PRIORITY_CLASS_CRITICAL)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def serve_under_critical_stream(aging_s: float, steps: int) -> tuple[Ticket, list[Ticket]]:
    """One slot, one BATCH waiter at t=0, then every 0.5 s two CRITICAL arrivals and one
    request served (an overloaded queue that never empties). Returns the BATCH ticket
    and the tickets admitted before it (all of them if it never was)."""
    clock = FakeClock()
    ac = AdmissionController(1, 10_000, aging_s=aging_s, clock=clock)
    running = ac.try_admit(CRITICAL)
    low = ac.try_admit(BATCH)
    waiting = [low]
    served_before: list[Ticket] = []
    for _ in range(steps):
        clock.t += 0.5
        waiting += [ac.try_admit(CRITICAL), ac.try_admit(CRITICAL)]
        ac.release(running)
        running = next(t for t in waiting if t.admitted)
        waiting.remove(running)
        if running is low:
            break
        served_before.append(running)
    return low, served_before


def test_aging_bounds_the_wait_behind_later_higher_classes() -> None:
    aging_s, gap = 2.0, CRITICAL - BATCH
    low, before = serve_under_critical_stream(aging_s, steps=200)
    assert low.admitted
    # Overtaken exactly by the CRITICAL requests that arrived less than gap * aging_s
    # after it: 2 per 0.5 s for 6 s.
    assert all(t.enqueued_at - low.enqueued_at < gap * aging_s for t in before)
    assert len(before) == 2 * int(gap * aging_s / 0.5 - 1)
    assert low.queue_seconds == pytest.approx(0.5 * (len(before) + 1))


def test_without_aging_a_low_class_starves() -> None:
    low, before = serve_under_critical_stream(0.0, steps=200)
    assert low.state == "waiting" and len(before) == 200


def test_aging_keeps_the_class_order_among_fresh_arrivals() -> None:
    clock = FakeClock()
    ac = AdmissionController(1, 10, aging_s=5.0, clock=clock)
    running = ac.try_admit()
    batch = ac.try_admit(BATCH)
    clock.t = 4.0
    normal = ac.try_admit(NORMAL)  # 4 s later, worth 5 s: ahead of batch
    clock.t = 6.0
    high = ac.try_admit(HIGH)  # 6 s after batch, worth 10 s: ahead; 2 s after normal
    ac.release(running)
    assert high.admitted
    ac.release(high)
    assert normal.admitted
    ac.release(normal)
    assert batch.admitted


def test_edf_aging_counts_a_class_as_seconds_of_deadline() -> None:
    order = QueueOrder("deadline", aging_s=10.0)
    assert order.ordering == "edf"
    high_late = order.key(HIGH, deadline=30.0, arrival=0.0, seq=0)
    normal_soon = order.key(NORMAL, deadline=15.0, arrival=0.0, seq=1)
    normal_sooner = order.key(NORMAL, deadline=25.0, arrival=0.0, seq=2)
    assert normal_soon < high_late < normal_sooner  # HIGH's 30 s counts as 20 s
    strict = QueueOrder("edf")
    assert strict.key(HIGH, 30.0, 0.0, 0) < strict.key(NORMAL, 15.0, 0.0, 1)


def test_an_aged_waiter_is_not_pushed_out_by_a_later_higher_class() -> None:
    clock = FakeClock()
    ac = AdmissionController(1, 1, aging_s=1.0, clock=clock)
    ac.try_admit()
    low = ac.try_admit(BATCH)
    clock.t = 10.0  # low has aged past HIGH's class
    with pytest.raises(AdmissionRejected, match="server overloaded"):
        ac.try_admit(HIGH)
    assert low.state == "waiting"
    fresh = AdmissionController(1, 1, aging_s=1.0, clock=clock)
    fresh.try_admit()
    young = fresh.try_admit(BATCH)
    high = fresh.try_admit(HIGH)  # arrives at once: still ahead, pushes the BATCH out
    assert young.state == "rejected" and high.state == "waiting"


def test_aging_comes_from_the_gateway_settings() -> None:
    assert GatewaySettings().queue_aging_s > 0  # on by default
    ac = queue_for(GatewaySettings(queue_policy="deadline", queue_aging_s=3.0))
    assert (ac.order.ordering, ac.order.aging_s) == ("edf", 3.0)
    with pytest.raises(ValueError, match="queue_aging_s must be >= 0"):
        queue_for(GatewaySettings(queue_aging_s=-1.0))
