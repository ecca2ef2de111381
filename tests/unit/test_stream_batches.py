"""A worker's reader of a request's outputs catches up in one go: ``batches`` gives all
that have arrived, ``merge_outputs`` makes them one message, in order, nothing lost."""

from __future__ import annotations

import pytest

from services.common.engine_loop import RequestStream
from services.engine.outputs import ExportedBlock, StepOutput, merge_outputs


def out(tokens: list[int], finished: bool = False, blocks: int = 0) -> StepOutput:
    exported = [ExportedBlock(i, bytes([i]), b"", 16) for i in range(blocks)]
    return StepOutput("r", tokens, finished, "length" if finished else None,
                      exported_blocks=exported)


def test_what_has_arrived_comes_at_once_and_the_end_ends_it() -> None:
    s = RequestStream("r")
    for o in (out([1]), out([2], blocks=1), out([3])):
        s._queue.put(o)
    batches = s.batches()
    first = next(batches)
    assert [o.new_token_ids for o in first] == [[1], [2], [3]]
    merged = merge_outputs(first)
    assert merged.new_token_ids == [1, 2, 3] and len(merged.exported_blocks) == 1
    assert not merged.finished
    s._queue.put(out([4], finished=True))
    s._queue.put(out([99]))  # never read: the stream ended before it
    (last,) = list(batches)
    assert merge_outputs(last).finished and merge_outputs(last).new_token_ids == [4]


def test_outputs_before_an_error_are_given_then_the_error_is_raised() -> None:
    s = RequestStream("r")
    s._queue.put(out([1]))
    s._queue.put(RuntimeError("engine failure"))
    batches = s.batches()
    assert [o.new_token_ids for o in next(batches)] == [[1]]
    with pytest.raises(RuntimeError, match="engine failure"):
        next(batches)
