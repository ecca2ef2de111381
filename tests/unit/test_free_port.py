"""Ports for test clusters: free, never handed out twice, clear of the ephemeral range
(where any outgoing connection could take one before the service binds it)."""

from __future__ import annotations

import socket

from services.common.launcher import _ephemeral_start, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if _ephemeral_start() > 10000:  # else there is no room below it: the kernel chooses
        assert all(p < _ephemeral_start() for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
