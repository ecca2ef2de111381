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
