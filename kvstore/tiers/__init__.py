"""Storage tiers of the KV store: one interface, a CPU arena now (GPU, disk, Redis later)."""

from kvstore.tiers.base import Slot, Tier
from kvstore.tiers.cpu import CpuTier

__all__ = ["CpuTier", "Slot", "Tier"]
