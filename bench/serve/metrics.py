"""Per-request numbers and their summary: latency percentiles, throughput, goodput."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    session_id: str
    turn: int
    sent_s: float  # since the start of the run
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    ttft_s: float
    e2e_s: float
    itl_s: list[float] = field(default_factory=list)  # gaps between token arrivals
    ok: bool = True
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for one-token answers)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slo: Slo) -> bool:
        return self.ok and self.ttft_s <= slo.ttft_s and self.tpot_s <= slo.tpot_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 0.2
    tpot_s: float = 0.05


def parse_slo(text: str) -> Slo:
    """``ttft=200ms,tpot=50ms`` (units ms or s)."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, raw = part.partition("=")
        if key not in ("ttft", "tpot") or not raw:
            raise ValueError(f"--slo: expected ttft=..,tpot=.. (e.g. ttft=200ms,tpot=50ms), "
                             f"got {part!r}")
        scale = 1e-3 if raw.endswith("ms") else 1.0
        try:
            values[f"{key}_s"] = float(raw.removesuffix("ms").removesuffix("s")) * scale
        except ValueError as e:
            raise ValueError(f"--slo: {part!r} is not a duration") from e
    return Slo(**values)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    good = [r for r in records if r.meets(slo)]
    duration_s = max(duration_s, 1e-9)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "output_throughput": sum(r.output_tokens for r in ok) / duration_s,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.output_tokens > 1]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "goodput_share": len(good) / len(records) if records else 0.0,
        "goodput": len(good) / duration_s,
        "errors": sorted({r.error for r in records if not r.ok})[:10],
    }
