"""Prometheus metrics of the services (default registry, served on /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """What a prefill or decode worker reports."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.tokens = Counter("splitserve_worker_tokens", "Tokens handled by this worker",
                              ["role", "kind"])
        self.prefill_seconds = Histogram("splitserve_prefill_seconds",
                                         "Time of one prefill request on the worker",
                                         buckets=LATENCY_BUCKETS)
        self.active = Gauge("splitserve_worker_active_requests", "Requests on this worker",
                            ["role"])
        self.kv_blocks = Counter("splitserve_kv_connector_blocks",
                                 "KV blocks handed to requests, by where they came from",
                                 ["role", "source"])
        self.kv_saved = Counter("splitserve_kv_connector_saved_blocks",
                                "KV blocks offered to the store (full ones and private "
                                "tails); blocks it already holds for a request are not",
                                ["role"])

    def observe_kv_load(self, engine_blocks: int, store_blocks: int) -> None:
        self.kv_blocks.labels(self.role, "engine").inc(engine_blocks)
        self.kv_blocks.labels(self.role, "store").inc(store_blocks)

    def observe_kv_saved(self, out: Any, with_tail: bool) -> None:
        """The blocks of one engine output (``StepOutput``) on their way to the store."""
        tail = with_tail and out.tail_block is not None
        self.kv_saved.labels(self.role).inc(len(out.exported_blocks) + tail)

    def observe_prefill(self, computed: int, cached: int, seconds: float) -> None:
        self.tokens.labels(self.role, "prefill_computed").inc(computed)
        self.tokens.labels(self.role, "prefill_cached").inc(cached)
        self.prefill_seconds.observe(seconds)

    def observe_decoded(self, n: int) -> None:
        self.tokens.labels(self.role, "decoded").inc(n)

    def watch_engine(self, stats: Callable[[], Any]) -> None:
        """Export the engine's own counters (``EngineStats``), read at scrape time."""
        REGISTRY.register(_EngineCollector(self.role, stats))


class _EngineCollector(Collector):
    COUNTERS = (  # (metric, EngineStats field, help)
        ("splitserve_engine_computed_tokens", "num_computed_tokens",
         "Tokens run through the model"),
        ("splitserve_engine_imported_tokens", "num_imported_tokens",
         "Tokens whose KV was handed in (store, migration, swap-in)"),
        ("splitserve_engine_prefix_hit_tokens", "num_prefix_hit_tokens",
         "Tokens taken from the engine's prefix cache"),
        ("splitserve_engine_preemptions", "num_preemptions",
         "Sequences preempted because the KV cache ran out"),
        ("splitserve_engine_swapped_out", "num_swapped_out",
         "Preempted sequences whose KV was swapped out (not recomputed)"),
        ("splitserve_engine_discarded_tokens", "num_discarded_tokens",
         "Tokens of steps launched ahead (async scheduling) for requests that had ended"),
    )

    def __init__(self, role: str, stats: Callable[[], Any]) -> None:
        self.role, self.stats = role, stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        st = self.stats()
        for name, field, text in self.COUNTERS:
            family = CounterMetricFamily(name, text, labels=["role"])
            family.add_metric([self.role], getattr(st, field))
            yield family


@dataclass(frozen=True)
class ModelMetrics:
    """The gateway's per-request series of one model (children labelled ``model``)."""

    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    cached_tokens: Counter
    output_tokens: Counter
    migrations: Counter
    preemptions: Counter


class GatewayMetrics:
    """Request series carry the model's name (``model``; "" for a request refused
    before its model was known)."""

    def __init__(self) -> None:
        self.ttft = Histogram("splitserve_time_to_first_token_seconds",
                              "Arrival to first token streamed", ["model"],
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("splitserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a request", ["model"],
                              buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("splitserve_request_latency_seconds", "Arrival to last token",
                             ["model"], buckets=LATENCY_BUCKETS)
        self.requests = Counter("splitserve_requests", "Finished requests",
                                ["model", "outcome"])
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens received",
                                     ["model"])
        self.cached_tokens = Counter("splitserve_cached_prompt_tokens",
                                     "Prompt tokens whose KV came from a cache", ["model"])
        self.output_tokens = Counter("splitserve_output_tokens", "Tokens streamed to clients",
                                     ["model"])
        self.queued = Gauge("splitserve_queued_requests", "Requests waiting for admission")
        self.inflight = Gauge("splitserve_inflight_requests", "Requests being served")
        self.migrations = Counter("splitserve_migrations",
                                  "Requests moved to another worker after one failed", ["model"])
        self.preemptions = Counter("splitserve_preemptions",
                                   "Requests paused to give their place to a higher class",
                                   ["model"])

    def of_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self.ttft.labels(model), self.tpot.labels(model),
                            self.e2e.labels(model), self.prompt_tokens.labels(model),
                            self.cached_tokens.labels(model), self.output_tokens.labels(model),
                            self.migrations.labels(model), self.preemptions.labels(model))
