"""Which deployment serves the most requests per second per GPU within the SLO."""

from __future__ import annotations

from dataclasses import dataclass

from bench.plan.simulator import Deployment, Simulation
from bench.plan.step_model import StepModel
from bench.serve.arrivals import arrival_times
from bench.serve.metrics import Slo, summarize
from bench.serve.workloads import Session


@dataclass
class Prediction:
    deployment: Deployment
    rate: float  # the highest rate (sessions/s) whose goodput share meets the target
    goodput: float  # requests/s within the SLO at that rate

    @property
    def per_gpu(self) -> float:
        return self.goodput / max(1, self.deployment.gpus)


def candidates(gpus: int, max_num_seqs: int, max_num_batched_tokens: int) -> list[Deployment]:
    limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
    out = [Deployment(colocated=n, **limits) for n in range(1, gpus + 1)]
    out += [Deployment(prefill=p, decode=d, **limits)
            for p in range(1, gpus) for d in range(1, gpus - p + 1)]
    return out


def simulate(deployment: Deployment, model: StepModel, sessions: list[Session], rate: float,
             slo: Slo, arrivals: str = "poisson", burstiness: float = 1.0, seed: int = 0,
             hop_s: float = 0.0, handoff_s: float = 0.0, step_overhead_s: float = 0.0) -> dict:
    """The summary `bench serve` would print for this deployment at this rate."""
    times = arrival_times(arrivals, len(sessions), rate, burstiness, seed)
    sim = Simulation(deployment, model, hop_s=hop_s, handoff_s=handoff_s,
                     step_overhead_s=step_overhead_s)
    records = sim.run(sessions, times)
    end = max((r.sent_s + r.e2e_s for r in records), default=1e-9)
    return summarize(records, end, slo)


def max_rate(deployment: Deployment, model: StepModel, sessions: list[Session], slo: Slo,
             target: float, **kwargs: object) -> Prediction:
    """Doubling, then bisection, on the offered rate."""
    def share(rate: float) -> float:
        return simulate(deployment, model, sessions, rate, slo, **kwargs)["goodput_share"]

    lo, hi = 0.0, 0.25
    while share(hi) >= target and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) >= target else (lo, mid)
    if lo == 0.0:
        return Prediction(deployment, 0.0, 0.0)
    summary = simulate(deployment, model, sessions, lo, slo, **kwargs)
    return Prediction(deployment, lo, summary["goodput"])
