"""The time of one engine step as a linear function of its work (no torch here).

``t = base + per_token * T + per_attention * A + per_seq * B + per_context * C`` with
T prefill tokens, A = sum over prefill chunks of (new tokens x context) (attention
work), B decoding sequences and C their summed context. The coefficients are fitted
by least squares to profiled steps (``profile.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FEATURES = ("base", "per_token", "per_attention", "per_seq", "per_context")


@dataclass(frozen=True)
class StepWork:
    prefill_tokens: int = 0
    prefill_attention: int = 0  # sum of new tokens x context over prefill chunks
    decode_seqs: int = 0
    decode_context: int = 0  # sum of the decoding sequences' contexts

    def features(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.prefill_attention, self.decode_seqs,
                self.decode_context]


@dataclass(frozen=True)
class StepModel:
    base: float
    per_token: float
    per_attention: float
    per_seq: float
    per_context: float

    def seconds(self, work: StepWork) -> float:
        coef = (self.base, self.per_token, self.per_attention, self.per_seq, self.per_context)
        return max(0.0, sum(c * f for c, f in zip(coef, work.features(), strict=True)))

    @classmethod
    def fit(cls, samples: list[tuple[StepWork, float]]) -> StepModel:
        """Least squares with non-negative coefficients (a clipped refit)."""
        x = np.array([w.features() for w, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        active = list(range(len(FEATURES)))
        while True:
            coef = np.zeros(len(FEATURES))
            sol, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
            coef[active] = sol / scale[active]
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                return cls(*coef.tolist())
            active = [i for i in active if i not in negative]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> StepModel:
        return cls(**json.loads(path.read_text()))
