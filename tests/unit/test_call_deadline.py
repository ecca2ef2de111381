"""A request's deadline reaches the store: calls inside call_deadline get the time left,
and one the deadline cut short is reported as the deadline."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common.deadline import DeadlineExceeded, RequestDeadline
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


def _slow_server(delay_s: float) -> tuple[grpc.Server, str]:
    """A real gRPC server whose one method answers after ``delay_s``."""
    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(delay_s)
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})
    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_store_call_cut_by_the_request_deadline_is_that_deadline() -> None:
    """Inside ``RequestDeadline.store_calls`` a call that the request's deadline cut
    short is DeadlineExceeded (the worker answers DEADLINE_EXCEEDED), while a call
    that timed out on its own, before the deadline, stays the store's failure."""
    server, address = _slow_server(0.3)
    try:
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/test.Slow/Call")
            deadline = RequestDeadline(time.monotonic() + 0.05, 50.0)
            with pytest.raises(DeadlineExceeded, match="deadline of 50 ms"), \
                    deadline.store_calls():
                call(b"x", timeout=bounded(5.0))
            assert deadline.expired
            roomy = RequestDeadline(time.monotonic() + 30.0, 30000.0)
            with pytest.raises(grpc.RpcError) as e, roomy.store_calls():
                call(b"x", timeout=bounded(0.05))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not roomy.expired
    finally:
        server.stop(0)
