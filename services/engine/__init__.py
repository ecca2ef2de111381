"""SplitServe model engine (a library: no gRPC here).

Importing this package is cheap (the gateway imports ``block_hash`` from it);
torch-backed names are loaded on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "EngineConfig": "services.engine.config",
    "ModelConfig": "services.engine.config",
    "SamplingParams": "services.engine.sequence",
    "StepOutput": "services.engine.outputs",
    "ExportedBlock": "services.engine.outputs",
    "EngineStats": "services.engine.outputs",
    "SwappedOut": "services.engine.outputs",
    "LLMEngine": "services.engine.engine",
    "LLM": "services.engine.llm",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
