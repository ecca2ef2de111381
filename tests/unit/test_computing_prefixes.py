"""The registry of prefix blocks a worker's engine is computing: named, then expired."""

from __future__ import annotations

from services.common.computing_prefixes import ComputingPrefixes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_blocks_are_computing_until_their_ttl_passes() -> None:
    clock = Clock()
    reg = ComputingPrefixes(ttl_s=5.0, clock=clock)
    reg.add([b"a", b"b"])
    assert reg.computing(b"a") and reg.computing(b"b") and not reg.computing(b"c")
    clock.now += 4.9
    assert reg.computing(b"b")
    clock.now += 0.2
    assert not reg.computing(b"a") and not reg.computing(b"b")


def test_naming_a_block_again_renews_it_and_expired_ones_are_dropped() -> None:
    clock = Clock()
    reg = ComputingPrefixes(ttl_s=5.0, clock=clock)
    reg.add([b"a", b"b"])
    clock.now += 3.0
    reg.add([b"a"])  # a second request computes it too
    clock.now += 3.0
    reg.add([b"c"])  # drops b (expired), keeps the renewed a
    assert reg.computing(b"a") and not reg.computing(b"b") and reg.computing(b"c")
    assert len(reg) == 2
    reg.add([])
    assert len(reg) == 2
