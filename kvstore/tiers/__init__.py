"""Storage tiers of the KV store, one interface, built from settings by ``kind``.

A tier kind registers a factory with :func:`register`; :func:`build_tiers` turns the
``kvstore.tiers`` list of the settings (fastest first) into tiers. ``gpu`` (a device
arena, :mod:`kvstore.tiers.gpu`), ``cpu`` and ``disk`` are built in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvstore.tiers.base import BlockMeta, Found, Slot, Tier
from kvstore.tiers.cpu import CpuTier

# factory(spec without 'kind', store_id, where) -> Tier; ``where`` names the config path
TierFactory = Callable[[dict[str, Any], str, str], Tier]
_REGISTRY: dict[str, TierFactory] = {}


def register(kind: str, factory: TierFactory) -> None:
    _REGISTRY[kind] = factory


def kinds() -> list[str]:
    return sorted(_REGISTRY)


def build_tiers(specs: list[dict[str, Any]], store_id: str) -> list[Tier]:
    """Tiers from specs (``{kind, bytes, ...}``); ValueError names the bad key."""
    tiers: list[Tier] = []
    try:
        for i, spec in enumerate(specs):
            where = f"kvstore.tiers[{i}]"
            spec = dict(spec)
            kind = spec.pop("kind", None)
            factory = _REGISTRY.get(kind)  # type: ignore[arg-type]
            if factory is None:
                raise ValueError(f"{where}.kind: unknown tier kind {kind!r}; known: {kinds()}")
            tier = factory(spec, store_id, where)
            tier.kind = kind
            if any(t.name == tier.name for t in tiers):
                tier.name = f"{tier.name}{i}"
            tiers.append(tier)
    except BaseException:
        for t in tiers:
            t.close()
        raise
    if not tiers:
        raise ValueError("kvstore.tiers: a KV store needs at least one tier")
    if any(t.on_device for t in tiers):
        from kvstore.tiers.gpu import pin_host_tiers

        pin_host_tiers(tiers)
    return tiers


def take_options(spec: dict[str, Any], where: str, **defaults: Any) -> dict[str, Any]:
    """``spec``'s keys among ``defaults`` (typed like them); unknown keys are errors."""
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    out = {}
    for k, default in defaults.items():
        v = spec.get(k, default)
        if default is not None and not isinstance(v, type(default)):
            raise ValueError(f"{where}.{k}: expected {type(default).__name__}, got {v!r}")
        out[k] = v
    return out


def _cpu(spec: dict[str, Any], store_id: str, where: str) -> Tier:
    o = take_options(spec, where, bytes=0, shm=True)
    return CpuTier(o["bytes"], shm=o["shm"], store_id=store_id)


def _disk(spec: dict[str, Any], store_id: str, where: str) -> Tier:
    from kvstore.tiers.disk import ADMIT_RULES, DiskTier

    o = take_options(spec, where, bytes=0, path="", fsync=True, admit="all")
    if not o["path"]:
        raise ValueError(f"{where}.path: a disk tier needs a directory (path: ...)")
    if o["admit"] not in ADMIT_RULES:
        raise ValueError(f"{where}.admit: one of {list(ADMIT_RULES)}, got {o['admit']!r}")
    return DiskTier(o["bytes"], o["path"], fsync=o["fsync"], admit=o["admit"])


def _gpu(spec: dict[str, Any], store_id: str, where: str) -> Tier:
    from kvstore.tiers.gpu import GpuTier  # torch: only a store with a gpu tier needs it

    o = take_options(spec, where, bytes=0, device="cuda:0")
    return GpuTier(o["bytes"], o["device"])


register("cpu", _cpu)
register("gpu", _gpu)
register("disk", _disk)

__all__ = ["BlockMeta", "CpuTier", "Found", "Slot", "Tier", "build_tiers", "kinds",
           "register", "take_options"]
