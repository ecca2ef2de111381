"""The order of requests waiting for an admission slot (``gateway.queue_policy``).

``fcfs``: arrival only. ``priority``: class (higher first), then arrival. ``edf``
(alias ``deadline``): class, then the earliest deadline.

**Aging** (``gateway.queue_aging_s`` = A > 0) keeps a low class from starving: a
waiting request's class rises by one for every A seconds it has waited. Since every
waiter ages at the same rate, comparing ``class + waited / A`` at any moment is the
same as comparing ``arrival - class * A``: a class-k request counts as if it had
arrived k*A seconds earlier. The order never changes while requests wait, so the
queue stays one sorted list. The bound: a request of class p is never overtaken by a
request of class q > p that arrives more than (q - p) * A seconds after it, so it
waits behind at most what arrived in that window. ``edf`` ages the deadline the same
way (``deadline - class * A``): a class counts as A seconds of urgency, and a request
is never overtaken by one whose deadline is more than (q - p) * A after its own.
A = 0 turns aging off: classes are strict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ORDERINGS = ("priority", "edf", "fcfs")
ALIASES = {"deadline": "edf"}  # gateway.queue_policy: fcfs | priority | deadline

QueueKey = tuple[float, ...]


@dataclass(frozen=True)
class QueueOrder:
    ordering: str = "priority"
    aging_s: float = 0.0  # seconds of waiting worth one priority class; 0 -> no aging

    def __post_init__(self) -> None:
        ordering = ALIASES.get(self.ordering, self.ordering)
        if ordering not in ORDERINGS:
            raise ValueError(f"unknown ordering (gateway.queue_policy) {self.ordering!r}; "
                             "known: fcfs, priority, deadline (edf)")
        if not self.aging_s >= 0:  # also refuses NaN
            raise ValueError(f"gateway.queue_aging_s must be >= 0 seconds (0: no aging), "
                             f"got {self.aging_s!r}")
        object.__setattr__(self, "ordering", ordering)

    def key(self, priority: int, deadline: float | None, arrival: float, seq: int) -> QueueKey:
        """The sort key of a waiter, smallest first; ``seq`` (unique) breaks ties."""
        if self.ordering == "fcfs":
            return (seq,)
        when = arrival if self.ordering == "priority" else (
            math.inf if deadline is None else deadline)
        if self.aging_s:
            return (when - priority * self.aging_s, seq)
        return (-priority, when, seq)
