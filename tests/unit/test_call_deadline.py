"""A request's deadline reaches the store: calls inside call_deadline get the time left."""

from __future__ import annotations

import time

from services.transfer.base import bounded, call_deadline


def test_timeouts_are_cut_to_the_time_left() -> None:
    assert bounded(30.0) == 30.0  # no request deadline: the client's own timeout
    with call_deadline(0.5):
        assert 0.4 < bounded(30.0) <= 0.5
        assert bounded(0.1) == 0.1  # a shorter timeout of its own stays
        with call_deadline(None):  # no deadline inside: the outer one still holds
            assert bounded(30.0) <= 0.5
        time.sleep(0.6)
        assert bounded(30.0) == 0.001  # passed: the next call fails at once
    assert bounded(None) is None
