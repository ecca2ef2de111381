"""The per-client cap on blocks kept pinned in sessions (``gateway.session_max_blocks``)."""

from __future__ import annotations

from gateway.sessions import SessionBook


def test_the_oldest_sessions_go_first_and_only_the_clients_own() -> None:
    now = [0.0]
    book = SessionBook(max_blocks=10, ttl_s=100, clock=lambda: now[0])
    assert book.kept("a", "s1", 4) == [] and book.kept("a", "s2", 4) == []
    assert book.kept("b", "t1", 9) == []  # another client's blocks do not count
    assert book.kept("a", "s1", 4) == []  # continued: s1 is now the newest
    assert book.kept("a", "s3", 4) == ["s2"]
    book.ended("a", "s1")
    assert book.kept("a", "s4", 6) == []  # s3 (4) + s4 (6)
    now[0] = 101.0  # every session of "a" expired in the store
    assert book.kept("a", "s5", 10) == []


def test_one_session_larger_than_the_cap_is_kept_alone() -> None:
    book = SessionBook(max_blocks=4, ttl_s=100)
    assert book.kept("a", "s1", 3) == []
    assert book.kept("a", "s2", 9) == ["s1"]  # never lets go of the one just kept
    assert SessionBook(max_blocks=0, ttl_s=100).kept("a", "s", 10**6) == []  # no cap
