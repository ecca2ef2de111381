"""CUDA graph captures and Python's cycle collector: dead cycles are freed before the
captures, never during them (a cycle holding CUDA objects freed mid-capture breaks the
capture), and the collector is back as it was after, however the block ends."""

from __future__ import annotations

import gc
import weakref

import pytest

from services.engine.cuda_graphs import no_collection


class _Held:
    """Stands in for a CUDA object a dead cycle keeps alive."""


def _dead_cycle() -> weakref.ref:
    held = _Held()
    cycle: dict = {"held": held}
    cycle["self"] = cycle
    return weakref.ref(held)


def test_dead_cycles_are_freed_before_the_block_and_none_inside_it() -> None:
    before = _dead_cycle()
    with no_collection():
        assert before() is None  # freed on the way in
        assert not gc.isenabled()
        inside = _dead_cycle()
        for _ in range(10_000):  # allocations that would trigger collections
            [object() for _ in range(10)]
        assert inside() is not None  # nothing collected during the block
    assert gc.isenabled()
    gc.collect()
    assert inside() is None


def test_the_collector_is_restored_after_a_failure_and_left_off_if_it_was() -> None:
    with pytest.raises(RuntimeError), no_collection():
        raise RuntimeError("the capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
