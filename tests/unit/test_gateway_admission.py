"""Admission control: ordering, bounds, cancellation, retry hints, no slot leaks."""

from __future__ import annotations

import random
import threading
import time

import pytest

from gateway.admission import (
    AdmissionCancelled,
    AdmissionController,
    AdmissionRejected,
    Ticket,
)
from splitserve.v1 import common_pb2 as c

BATCH, NORMAL, HIGH, CRITICAL = (
    c.PRIORITY_CLASS_BATCH,
    c.PRIORITY_CLASS_NORMAL,
    c.PRIORITY_CLASS_HIGH,
    c.PRIORITY_CLASS_CRITICAL,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drain_order(ac: AdmissionController, first: Ticket, tickets: list[Ticket]) -> list[Ticket]:
    """Releases the running ticket over and over; returns tickets in admission order."""
    order, running = [], first
    for _ in tickets:
        ac.release(running)
        running = next(t for t in tickets if t.admitted and t not in order)
        order.append(running)
    return order


def test_admits_immediately_up_to_max_inflight() -> None:
    ac = AdmissionController(max_inflight=2, max_queue=1)
    a, b, w = ac.try_admit(), ac.try_admit(), ac.try_admit()
    assert a.admitted and b.admitted and not w.admitted and w.state == "waiting"
    assert (ac.inflight, ac.waiting) == (2, 1)
    ac.release(a)
    assert w.admitted and w.queue_seconds is not None and (ac.inflight, ac.waiting) == (2, 0)


def test_priority_then_fcfs() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=10)
    first = ac.try_admit(NORMAL)
    prios = [BATCH, NORMAL, HIGH, NORMAL, CRITICAL, 0, BATCH]  # 0 = unspecified
    tickets = [ac.try_admit(p) for p in prios]
    order = drain_order(ac, first, tickets)
    assert [tickets.index(t) for t in order] == [4, 2, 1, 3, 5, 0, 6]


def test_fcfs_and_edf_orderings() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=10, ordering="fcfs")
    first = ac.try_admit()
    tickets = [ac.try_admit(p) for p in (BATCH, CRITICAL, NORMAL)]
    assert drain_order(ac, first, tickets) == tickets

    ac = AdmissionController(max_inflight=1, max_queue=10, ordering="edf")
    first = ac.try_admit()
    tickets = [
        ac.try_admit(NORMAL, deadline=None),
        ac.try_admit(NORMAL, deadline=5.0),
        ac.try_admit(NORMAL, deadline=1.0),
        ac.try_admit(HIGH, deadline=100.0),
    ]
    order = drain_order(ac, first, tickets)
    assert [tickets.index(t) for t in order] == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="unknown ordering"):
        AdmissionController(1, 1, ordering="random")


def test_bounded_queue_rejects_with_retry_hint() -> None:
    clock = FakeClock()
    ac = AdmissionController(max_inflight=2, max_queue=2, clock=clock)
    # Service times of 2 s each -> the hint is about (waiting + 1) * 2 s / 2 slots.
    for _ in range(4):
        t = ac.try_admit()
        clock.t += 2.0
        ac.release(t)
    running = [ac.try_admit(), ac.try_admit()]
    waiting = [ac.try_admit(), ac.try_admit()]
    with pytest.raises(AdmissionRejected) as e:
        ac.try_admit()
    err = e.value
    assert err.retry_after_s == pytest.approx(3.0)
    assert err.retry_after_ms == 3000
    assert err.trailing_metadata() == (("retry-after-ms", "3000"),)
    assert "2 requests in flight (max_inflight 2)" in err.message
    assert "2 waiting (max_queue 2)" in err.message and "retry in about 3.0 s" in err.message
    s = ac.stats()
    assert (s.inflight, s.waiting, s.rejected_total, s.mean_service_s) == (2, 2, 1, 2.0)
    for t in running + waiting:
        ac.release(t)
    assert (ac.inflight, ac.waiting) == (0, 0)


def test_retry_hint_default_and_clamped() -> None:
    ac = AdmissionController(max_inflight=4, max_queue=0, default_service_s=1.0)
    assert ac.retry_after_s() == pytest.approx(0.25)
    ac = AdmissionController(max_inflight=1000, max_queue=0, default_service_s=0.001)
    assert ac.retry_after_s() == 0.05
    with pytest.raises(ValueError):
        AdmissionController(max_inflight=0, max_queue=1)


def test_zero_queue_rejects_once_full() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=0)
    t = ac.try_admit()
    with pytest.raises(AdmissionRejected):
        ac.try_admit(CRITICAL)
    ac.release(t)
    assert ac.try_admit().admitted


def test_higher_class_pushes_out_lowest_newest_waiter() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=2)
    run = ac.try_admit()
    b1, b2 = ac.try_admit(BATCH), ac.try_admit(BATCH)
    with pytest.raises(AdmissionRejected):
        ac.try_admit(BATCH)  # same class: refused, nobody pushed out
    h = ac.try_admit(HIGH)
    assert b2.state == "rejected" and b1.state == "waiting" and ac.waiting == 2
    with pytest.raises(AdmissionRejected, match="pushed out"):
        ac.wait(b2)
    assert ac.stats().shed_total == 1
    ac.release(run)
    assert h.admitted and not b1.admitted


def test_cancel_waiting_frees_its_place() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=1)
    run = ac.try_admit()
    w = ac.try_admit()
    ac.cancel(w)
    assert w.state == "cancelled" and ac.waiting == 0
    with pytest.raises(AdmissionCancelled):
        ac.wait(w)
    w2 = ac.try_admit()  # the place is free again
    ac.release(run)
    assert w2.admitted and ac.inflight == 1
    ac.release(w2)
    ac.release(w2)  # idempotent
    ac.cancel(w2)
    assert ac.inflight == 0


def test_slot_blocks_until_admitted() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=4)
    got = threading.Event()
    run = ac.try_admit()

    def waiter() -> None:
        with ac.slot(HIGH) as t:
            assert t.admitted
            got.set()

    th = threading.Thread(target=waiter)
    th.start()
    assert not got.wait(0.1)
    ac.release(run)
    assert got.wait(2)
    th.join(2)
    assert (ac.inflight, ac.waiting) == (0, 0)


def test_slot_cancelled_by_event_while_waiting() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=4)
    run = ac.try_admit()
    gone = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with ac.slot(NORMAL, gone):
                pytest.fail("must not be admitted")
        except AdmissionCancelled as e:
            errors.append(e)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    assert ac.waiting == 1
    gone.set()
    th.join(2)
    assert len(errors) == 1 and ac.waiting == 0 and ac.inflight == 1
    ac.release(run)
    assert ac.inflight == 0


def test_slot_timeout() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=4)
    run = ac.try_admit()
    start = time.monotonic()
    with pytest.raises(AdmissionRejected, match="waited 0.1 s"), ac.slot(timeout=0.1):
        pass
    assert 0.09 < time.monotonic() - start < 1.0
    assert ac.waiting == 0
    ac.release(run)


def test_slot_released_on_exception() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=0)
    with pytest.raises(RuntimeError), ac.slot():
        raise RuntimeError("boom")
    assert ac.inflight == 0


def test_admitted_then_cancelled_gives_slot_back() -> None:
    ac = AdmissionController(max_inflight=1, max_queue=1)
    gone = threading.Event()
    gone.set()
    t = ac.try_admit()
    with pytest.raises(AdmissionCancelled):
        ac.wait(t, gone)  # admitted, but the client is already gone
    assert ac.inflight == 0


def test_no_slot_leaks_under_concurrency() -> None:
    ac = AdmissionController(max_inflight=3, max_queue=8)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "served": 0, "rejected": 0, "cancelled": 0}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            gone = threading.Event()
            if rng.random() < 0.2:
                threading.Timer(rng.random() * 0.005, gone.set).start()
            try:
                with ac.slot(rng.choice([BATCH, NORMAL, HIGH, CRITICAL]), gone):
                    with lock:
                        state["now"] += 1
                        state["peak"] = max(state["peak"], state["now"])
                    time.sleep(rng.random() * 0.002)
                    with lock:
                        state["now"] -= 1
                        state["served"] += 1
            except AdmissionRejected:
                with lock:
                    state["rejected"] += 1
            except AdmissionCancelled:
                with lock:
                    state["cancelled"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert state["peak"] <= 3
    assert state["served"] + state["rejected"] + state["cancelled"] == 16 * 30
    assert state["served"] > 0
    s = ac.stats()
    assert (s.inflight, s.waiting) == (0, 0)
    assert s.rejected_total == state["rejected"]


@pytest.mark.parametrize(("policy", "expected"), [
    ("fcfs", [0, 1, 2, 3]),
    ("priority", [1, 3, 0, 2]),
    ("deadline", [3, 1, 0, 2]),  # classes first, then the earliest deadline
])
def test_queue_policy_orders_a_saturated_queue(policy: str, expected: list[int]) -> None:
    from splitserve.v1 import common_pb2

    ac = AdmissionController(1, 8, ordering=policy)
    busy = ac.try_admit()
    low, high = common_pb2.PRIORITY_CLASS_NORMAL, common_pb2.PRIORITY_CLASS_HIGH
    tickets = [ac.try_admit(low, deadline=50.0), ac.try_admit(high, deadline=90.0),
               ac.try_admit(low, deadline=60.0), ac.try_admit(high, deadline=10.0)]
    order = []
    current = busy
    for _ in tickets:
        ac.release(current)
        current = next(t for t in tickets if t.admitted and t not in order)
        order.append(current)
    assert [tickets.index(t) for t in order] == expected
