"""When sessions start: Poisson, gamma (bursty), fixed rate, or a closed loop."""

from __future__ import annotations

import random


def arrival_times(kind: str, n: int, rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[float] | None:
    """Start offsets in seconds of ``n`` sessions; None for a closed loop (each client
    starts its next session when the last one ends). Gamma inter-arrival gaps with
    shape ``burstiness`` (1 = Poisson, < 1 burstier) and mean ``1 / rate``."""
    if kind == "closed":
        return None
    if rate <= 0:
        raise ValueError(f"--rate must be > 0 for {kind} arrivals, got {rate}")
    if kind == "fixed":
        return [i / rate for i in range(n)]
    if kind == "poisson":
        burstiness = 1.0
    elif kind != "gamma":
        raise ValueError(f"unknown arrivals {kind!r}; known: poisson, gamma, fixed, closed")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
