"""One configuration path: every engine option reaches the engine from the cluster
YAML, and the YAML's defaults are the engine's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from services.common.settings import ModelSettings, load_settings
from services.common.worker import engine_config
from services.engine.config import ENGINE_OPTION_NAMES, EngineConfig, EngineOptions

CHANGED = {
    "dtype": "bfloat16", "device": "cuda", "block_size": 32, "num_kv_blocks": 100,
    "kv_cache_memory_gb": 2.5, "gpu_memory_utilization": 0.5, "max_num_seqs": 7,
    "max_num_batched_tokens": 333, "max_model_len": 4096, "enable_prefix_caching": False,
    "attention_backend": "triton", "enforce_eager": True, "seed": 9,
    "preemption_mode": "recompute", "swap_space_gb": 1.5, "async_scheduling": False,
}


def test_every_option_is_covered() -> None:
    assert set(CHANGED) == set(ENGINE_OPTION_NAMES)


def test_yaml_defaults_are_the_engine_defaults() -> None:
    engine = EngineConfig(model="dummy:tiny-llama")
    yaml_side = ModelSettings()
    for name in ENGINE_OPTION_NAMES:
        assert getattr(yaml_side, name) == getattr(engine, name), name
    assert {f.name for f in dataclasses.fields(EngineOptions)} <= {
        f.name for f in dataclasses.fields(ModelSettings)}


def test_every_option_travels_from_yaml_to_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "m", "path": "dummy:tiny-llama",
                                              **CHANGED}}))
    config = engine_config(load_settings(path).model)
    for name, value in CHANGED.items():
        assert getattr(config, name) == value, name
    assert (config.model, config.model_id) == ("dummy:tiny-llama", "m")


def test_async_scheduling_defaults_to_the_device() -> None:
    """null in the YAML: on for CUDA (where the overlap's GPU tests pass), off on the
    CPU; either way it can be forced."""
    def resolved(**kw: object) -> bool | None:
        return EngineConfig(model="dummy:tiny-llama", **kw).finalize().async_scheduling

    assert ModelSettings().async_scheduling is None
    assert resolved() is False and resolved(device="cuda") is True
    assert resolved(device="cuda", async_scheduling=True) is True
    assert resolved(device="cuda", async_scheduling=False) is False
    assert resolved(async_scheduling=True) is True
