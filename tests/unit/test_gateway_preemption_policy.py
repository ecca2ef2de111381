"""The preemption policy of ``gateway.preemption``: who may take whose place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from gateway.preemption import Decoding, Preemptor
from gateway.router import DECODE, WorkerInfo
from services.common.settings import PreemptionSettings, load_settings
from splitserve.v1 import common_pb2 as c

BATCH, NORMAL, HIGH, CRITICAL = (c.PRIORITY_CLASS_BATCH, c.PRIORITY_CLASS_NORMAL,
                                 c.PRIORITY_CLASS_HIGH, c.PRIORITY_CLASS_CRITICAL)


def decoding(name: str, priority: int, stopped: list[str]) -> Decoding:
    return Decoding(name, priority, lambda: stopped.append(name))


@contextmanager
def full_worker_with(policy: PreemptionSettings, *placed: Decoding) -> Iterator[Preemptor]:
    """A preemptor over one decode worker whose batch ``placed`` fills."""
    worker = WorkerInfo("d0", "127.0.0.1:1", DECODE, max_num_seqs=len(placed))
    pre = Preemptor(lambda role: [worker] if role == DECODE else [], policy)
    with ExitStack() as stack:
        for d in placed:
            stack.enter_context(pre.placed(d, worker))
        yield pre


def test_default_policy_preempts_any_lower_class_at_most_twice() -> None:
    stopped: list[str] = []
    low = decoding("low", BATCH, stopped)
    high = decoding("high", NORMAL, stopped)
    with full_worker_with(PreemptionSettings(), low) as pre:
        assert pre.make_room(high) and pre.make_room(high)
        assert not pre.make_room(high)  # max_per_request: 2
    assert stopped == ["low", "low"] and low.preemptions == 2
    assert not pre.may_preempt(decoding("same", BATCH, stopped), decoding("x", BATCH, []))


def test_disabled_policy_never_preempts() -> None:
    stopped: list[str] = []
    low = decoding("low", BATCH, stopped)
    with full_worker_with(PreemptionSettings(enabled=False), low) as pre:
        assert not pre.make_room(decoding("top", CRITICAL, stopped)) and stopped == []


def test_min_class_gap_and_protected_classes() -> None:
    stopped: list[str] = []
    normal, high = decoding("normal", NORMAL, stopped), decoding("high", HIGH, stopped)
    policy = PreemptionSettings(min_class_gap=2, protected=["High"])
    with full_worker_with(policy, normal, high) as pre:
        assert not pre.make_room(decoding("h2", HIGH, stopped))  # one class above: too close
        assert pre.make_room(decoding("top", CRITICAL, stopped))  # two above normal
        assert stopped == ["normal"]  # high is protected even from CRITICAL
        assert not pre.may_preempt(decoding("top", CRITICAL, stopped), high)


def test_policy_from_the_cluster_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gateway:\n  max_migrations: 1\n  preemption:\n"
                    "    {enabled: false, max_per_request: 5, protected: [critical]}\n")
    gw = load_settings(path).gateway
    assert gw.max_migrations == 1
    assert gw.preemption == PreemptionSettings(enabled=False, max_per_request=5,
                                               protected=["critical"])
    assert gw.preemption.protected_classes() == {CRITICAL}


def test_a_place_freed_here_counts_before_the_next_load_report() -> None:
    """The worker's last report still shows a request that ended here: the place is
    free at once; a later report is believed as it is."""
    from splitserve.v1 import worker_pb2

    worker = WorkerInfo("d0", "127.0.0.1:1", DECODE)
    pre = Preemptor(lambda role: [worker] if role == DECODE else [])

    def report(running: int) -> None:
        worker.update_load(worker_pb2.WorkerLoad(running=running, max_num_seqs=1))

    report(0)
    d = decoding("d", NORMAL, [])
    with pre.placed(d, worker):
        report(1)  # the worker now reports it running
        assert pre.full(worker)
    assert not pre.full(worker)  # ended here: free before the worker says so
    report(1)  # a newer report: someone else's request holds the place
    assert pre.full(worker)
    report(0)
    quick = decoding("quick", NORMAL, [])
    with pre.placed(quick, worker):
        pass  # ended before any report counted it: nothing to correct
    report(1)
    assert pre.full(worker)


def test_the_victim_is_the_lowest_class_then_the_latest_placed() -> None:
    stopped: list[str] = []
    early, late = decoding("early", BATCH, stopped), decoding("late", BATCH, stopped)
    normal = decoding("normal", NORMAL, stopped)
    with full_worker_with(PreemptionSettings(), early, normal, late) as pre:
        assert pre.make_room(decoding("high", HIGH, stopped))
    assert stopped == ["late"]
