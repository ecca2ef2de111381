"""Data-plane metrics (prometheus_client default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TRANSFER_BYTES = Counter(
    "splitserve_kv_transfer_bytes",
    "KV block bytes moved between a process and a KV store",
    ["transport", "direction"],
)
TRANSFER_SECONDS = Histogram(
    "splitserve_kv_transfer_seconds",
    "Time of one put or get of KV blocks",
    ["transport", "direction"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
TRANSPORT_CHOICES = Counter(
    "splitserve_kv_transport_choices",
    "Transports opened to a KV store, by the transport the ladder chose",
    ["transport"],
)
TRANSPORT_FALLBACKS = Counter(
    "splitserve_kv_transport_fallbacks",
    "Requests retried on the next transport down the ladder after one failed mid-request",
    ["from_transport", "to_transport"],
)


class TransferMeter:
    """One transport's put and get series: the time of each call and its bytes."""

    def __init__(self, transport: str) -> None:
        self._bytes = {d: TRANSFER_BYTES.labels(transport, d) for d in ("put", "get")}
        self._seconds = {d: TRANSFER_SECONDS.labels(transport, d) for d in ("put", "get")}

    def observe(self, direction: str, seconds: float, nbytes: int) -> None:
        self._seconds[direction].observe(seconds)
        self._bytes[direction].inc(nbytes)
