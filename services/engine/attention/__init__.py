"""Attention backends, picked by name (``EngineConfig.attention_backend``).

A backend is a class built with ``(num_heads, num_kv_heads, head_dim, scale)``
whose ``forward(q, k, v, k_cache, v_cache, meta)`` writes the new K/V into the
paged cache and returns the attention output; ``supports_cuda_graphs`` says
whether its decode path may be captured. ``torch`` runs anywhere (the reference),
``triton`` on CUDA; ``auto`` (resolved by ``EngineConfig.finalize``) is triton
on CUDA, torch elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.engine.attention.metadata import AttentionMetadata, PrefillChunk

_BACKENDS: dict[str, Callable[[], type]] = {}


def register_backend(name: str, loader: Callable[[], type]) -> None:
    """Register a backend class under ``name``; ``loader`` imports it lazily."""
    _BACKENDS[name] = loader


def _torch() -> type:
    from services.engine.attention.torch_backend import TorchAttention

    return TorchAttention


def _triton() -> type:
    from services.engine.attention.triton_backend import TritonAttention

    return TritonAttention


register_backend("torch", _torch)
register_backend("triton", _triton)


def get_attention_backend(name: str) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


__all__ = ["AttentionMetadata", "PrefillChunk", "get_attention_backend", "register_backend"]
