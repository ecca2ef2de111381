"""Landing pads: a spilled device put committed before its copies have landed.

A device writer whose put spilled into the host arena copies there by DMA, on its CUDA
stream. Waiting for those copies before sending CommitPut leaves a whole RPC after the
last byte crosses the link. Instead, BeginPut hands the writer a *pad* (8 bytes in the
shared arena's header) and a random *token*; the writer enqueues the token's write to
the pad on the same stream, after its copies, and sends CommitPut at once. Stream order
puts the token in host memory only after the copies, so the store commits when the pad
holds the token.

The store reads nothing but its own shared memory: a writer that dies or hangs leaves
the token unwritten, and the commit gives up at its deadline and drops the put. A token
written late into a pad already given to another put is ignored: tokens differ.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import NamedTuple

from services.transfer.contract.arena import LANDING_BASE, LANDING_PADS, PAD_BYTES

LANDING_WAIT_S = 10.0  # a commit waits this long at most for its put's token
POLL_FIRST_S, POLL_MOST_S = 20e-6, 100e-6  # the first poll's sleep; it doubles to this
_EMPTY = bytes(PAD_BYTES)


class Pad(NamedTuple):
    offset: int  # in the arena (its header)
    token: int  # what the writer writes there: 63 random bits, never 0


class LandingPads:
    """The pads of one shared arena's header. ``take`` and ``give_back`` run under the
    store's lock; ``landed`` reads without it (the writer's DMA is the only writer)."""

    def __init__(self, header: memoryview) -> None:
        self._header = header
        self._free = [LANDING_BASE + i * PAD_BYTES for i in range(LANDING_PADS)]

    def take(self) -> Pad | None:
        """A free pad with a new token (the pad cleared), or None: all are in use."""
        if not self._free:
            return None
        offset = self._free.pop()
        self._header[offset : offset + PAD_BYTES] = _EMPTY
        return Pad(offset, secrets.randbits(63) or 1)

    def give_back(self, pad: Pad) -> None:
        self._header[pad.offset : pad.offset + PAD_BYTES] = _EMPTY
        self._free.append(pad.offset)

    def landed(self, pad: Pad) -> bool:
        return (self._header[pad.offset : pad.offset + PAD_BYTES]
                == pad.token.to_bytes(PAD_BYTES, "little"))

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        self._header.release()


def wait_landed(landed: Callable[[], bool], until: float,
                wanted: Callable[[], bool]) -> bool:
    """Polls ``landed`` until it holds (True), or until ``until`` (monotonic) passes or
    ``wanted`` stops holding (False). The sleeps grow from POLL_FIRST_S to POLL_MOST_S:
    a chunk's copies take milliseconds, and a token is seen within ~0.1 ms of landing."""
    delay = POLL_FIRST_S
    while not landed():
        if time.monotonic() >= until or not wanted():
            return False
        time.sleep(delay)
        delay = min(2 * delay, POLL_MOST_S)
    return True
