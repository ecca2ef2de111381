"""A caller's block hashes seed the engine's (computed once per request), and equal them."""

from __future__ import annotations

import pytest

from services.engine.block_hash import block_hashes
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams


@pytest.fixture
def engine(tiny_llama_dir):
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64,
                                  enable_prefix_caching=True), use_tqdm=False)


def _run(engine, rid, prompt, **kw):
    engine.add_request(rid, prompt, SamplingParams(max_tokens=2), **kw)
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return out


def test_given_hashes_are_the_engines_own_and_share_the_prefix(engine):
    prompt = list(range(5, 5 + 40))  # 2 full blocks of 16 and a tail
    hashes = block_hashes(prompt, engine.block_manager.hash_ctx, cache_salt="t")
    first = _run(engine, "a", prompt, cache_salt="t", block_hashes=hashes)
    assert engine.block_manager.cached_prefix_blocks(hashes) == 2
    again = _run(engine, "b", prompt, cache_salt="t")  # the engine hashes it itself
    assert again == first
    assert engine.stats().num_prefix_hit_tokens == 32


def test_more_hashes_than_full_blocks_are_refused(engine):
    with pytest.raises(ValueError, match="3 block hashes for 40 tokens"):
        engine.add_request("x", list(range(40)), SamplingParams(max_tokens=1),
                           block_hashes=[b"h" * 16] * 3)
