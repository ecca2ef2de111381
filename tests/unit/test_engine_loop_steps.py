"""SPLITSERVE_LOG_STEPS: the engine loop logs each step with the engine's section times."""

from __future__ import annotations

import logging

import pytest

from services.common.engine_loop import LOG_STEPS_ENV, EngineLoop
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams


def test_each_step_is_logged_with_its_sections(tiny_llama_dir, monkeypatch, caplog):
    monkeypatch.setenv(LOG_STEPS_ENV, "1")
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64),
                       use_tqdm=False)
    loop = EngineLoop(engine, name="test")
    try:
        with caplog.at_level(logging.INFO, logger="splitserve.test"):
            outs = list(loop.submit("r", [5, 6, 7, 8], SamplingParams(max_tokens=3)))
    finally:
        loop.stop()
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 3
    steps = [r.fields for r in caplog.records if r.getMessage() == "step"]
    assert len(steps) >= 3
    assert all(s["ms"] > 0 and "forward_ms" in s for s in steps)
    assert sum(s["outputs"] for s in steps) == len(outs)


@pytest.mark.parametrize("value", ["", "0"])
def test_steps_are_not_logged_by_default(tiny_llama_dir, monkeypatch, caplog, value):
    monkeypatch.setenv(LOG_STEPS_ENV, value)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64),
                       use_tqdm=False)
    loop = EngineLoop(engine, name="test")
    try:
        with caplog.at_level(logging.INFO, logger="splitserve.test"):
            list(loop.submit("r", [5, 6, 7], SamplingParams(max_tokens=2)))
    finally:
        loop.stop()
    assert not [r for r in caplog.records if r.getMessage() == "step"]
    assert not engine.runner.profiler.enabled
