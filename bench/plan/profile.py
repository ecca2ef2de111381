"""Profile the engine on this machine: prefill steps of growing size, decode steps of
growing batch and context; fit a ``StepModel``."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.plan.step_model import StepModel, StepWork

if TYPE_CHECKING:
    from services.engine.config import EngineConfig


def _timed(step: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _grid(top: int, start: int) -> list[int]:
    out, n = [], start
    while n < top:
        out.append(n)
        n *= 2
    return out + [top]


def profile_engine(config: EngineConfig, repeat: int = 3,
                   progress: Callable[[str], None] = print) -> list[tuple[StepWork, float]]:
    """(work, seconds) of measured steps of an ``LLMEngine`` built with ``config``, its
    prefix cache off: the profile's prompts repeat, and a step must compute what it is
    timed for (the simulator accounts for prefix reuse itself)."""
    from services.engine import LLMEngine, SamplingParams

    engine = LLMEngine(dataclasses.replace(config, enable_prefix_caching=False), use_tqdm=False)
    cfg = engine.config
    samples: list[tuple[StepWork, float]] = []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.add_request("warm", [5] * 16, one)
    while engine.has_unfinished():
        engine.step()
    budget = min(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
    for n in _grid(budget, 16):
        def prefill(n: int = n) -> None:
            engine.add_request(f"p{n}-{time.perf_counter_ns()}", [7] * n, one)
            engine.step()
        samples.append((StepWork(prefill_tokens=n, prefill_attention=n * n),
                        _timed(prefill, repeat)))
        progress(f"prefill {n} tokens: {1e3 * samples[-1][1]:.2f} ms")
    for batch in _grid(cfg.max_num_seqs, 1):
        for ctx in _grid(min(cfg.max_model_len // 2, 1024), 64):
            if batch * (ctx // cfg.block_size + 2) > engine.num_kv_blocks:
                continue
            samples.append((StepWork(decode_seqs=batch, decode_context=batch * ctx),
                            _decode_step(engine, batch, ctx, repeat)))
            progress(f"decode batch {batch} context {ctx}: {1e3 * samples[-1][1]:.2f} ms")
    return samples


def _decode_step(engine: object, batch: int, ctx: int, repeat: int) -> float:
    from services.engine import SamplingParams

    cfg = engine.config  # type: ignore[attr-defined]
    # prompts prefilled early decode while the rest prefill: none may finish before the
    # timed steps (the batch would shrink, or be gone)
    prefill_steps = -(-batch * ctx // cfg.max_num_batched_tokens) + 2
    many = SamplingParams(max_tokens=min(repeat + 4 + prefill_steps,
                                         cfg.max_model_len - ctx + 1), ignore_eos=True)
    ids = [f"d{batch}-{ctx}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [9] * (ctx - 1), many)
    while engine.stats().num_waiting or any(  # until every prompt is prefilled
            r in engine.seqs and engine.seqs[r].num_computed_tokens < ctx - 1 for r in ids):
        engine.step()
    engine.step()  # the first decode step (may carry the last prefill token)
    seconds = _timed(engine.step, repeat)
    for rid in ids:
        engine.abort(rid)
    return seconds


def fit_profile(samples: list[tuple[StepWork, float]]) -> StepModel:
    return StepModel.fit(samples)
