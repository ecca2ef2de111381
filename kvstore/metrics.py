"""The store's state as Prometheus metrics, read from the index at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.store import KVStoreCore

TIER_GAUGES = (
    ("capacity_bytes", "Bytes per tier"),
    ("used_bytes", "Bytes in use per tier"),
    ("tier_blocks", "Blocks held per tier"),
)
TIER_COUNTERS = (
    ("tier_hits", "Blocks Get found in this tier", "hits"),
    ("tier_misses", "Blocks Get asked and this tier did not hold", "misses"),
    ("tier_promotions", "Blocks raised into this tier from a slower one", "promotions"),
    ("tier_demotions", "Blocks moved from this tier to the next", "demotions"),
    ("tier_evictions", "Blocks deleted from this tier to make room", "evictions"),
    ("tier_checksum_failures", "Blocks of this tier dropped for a failed crc32",
     "checksum_failures"),
)


class StoreCollector(Collector):
    def __init__(self, core: KVStoreCore) -> None:
        self.core = core

    def collect(self):
        s = self.core.stats()
        for name, doc, value in (
            ("blocks", "Committed blocks held", s.blocks),
            ("pinned_blocks", "Blocks pinned by at least one owner", s.pinned_blocks),
            ("pins", "Pins held (owner, block)", s.pins),
            ("owners", "Owners holding pins or private blocks", s.owners),
            ("pending_puts", "Puts begun and not yet committed", s.pending_puts),
            ("moves_pending", "Blocks queued for, or being copied in, a move between tiers",
             s.moves_pending),
        ):
            yield GaugeMetricFamily(f"splitserve_kvstore_{name}", doc, value=value)
        for name, doc, value in (
            ("hits", "Blocks served by Get", s.hits),
            ("misses", "Blocks asked of Get and not held", s.misses),
            ("evictions", "Blocks evicted to make room", s.evictions),
            ("promotions", "Blocks raised to a faster tier", s.promotions),
            ("demotions", "Blocks moved down to a slower tier", s.demotions),
            ("puts_refused", "Puts refused for lack of room", s.puts_refused),
            ("landings_missed", "Puts dropped: their landing token never came",
             s.landings_missed),
            ("checksum_failures", "Blocks dropped for a failed crc32", s.checksum_failures),
            ("blocks_stored", "Blocks newly stored", s.blocks_stored),
            ("lookups", "Lookup calls", s.lookups),
            ("lookup_keys", "Keys asked of Lookup", s.lookup_keys),
            ("lookup_hit_blocks", "Keys of Lookup found in the held prefix", s.lookup_hit_blocks),
            ("expired_owners", "Owners whose pins expired unreleased", s.expired_owners),
        ):
            yield CounterMetricFamily(f"splitserve_kvstore_{name}", doc, value=value)
        for name, doc in TIER_GAUGES:
            g = GaugeMetricFamily(f"splitserve_kvstore_{name}", doc, labels=["tier"])
            for t in s.tiers:
                g.add_metric([t.name], getattr(t, name.removeprefix("tier_")))
            yield g
        for name, doc, field in TIER_COUNTERS:
            c = CounterMetricFamily(f"splitserve_kvstore_{name}", doc, labels=["tier"])
            for t in s.tiers:
                c.add_metric([t.name], getattr(t, field))
            yield c
