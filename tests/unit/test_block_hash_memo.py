"""block_hashes remembers digests it computed: a repeated prefix gets the very digests
hash_block defines, different contexts and salts never share one, and the memory of
them is bounded."""

from __future__ import annotations

import random

import pytest

from services.engine import block_hash
from services.engine.block_hash import HashContext, block_hashes, hash_block

CTX = HashContext("memo-model", 4, "float32")


def _by_definition(tokens: list[int], ctx: HashContext, salt: str = "") -> list[bytes]:
    out, parent = [], None
    for i in range(len(tokens) // ctx.block_size):
        parent = hash_block(parent, tokens[i * ctx.block_size:(i + 1) * ctx.block_size],
                            ctx, salt)
        out.append(parent)
    return out


@pytest.fixture(autouse=True)
def empty_memo():
    block_hash._memo.clear()
    yield
    block_hash._memo.clear()


def test_a_repeated_prefix_gets_the_defined_digests_from_memory() -> None:
    rng = random.Random(3)
    prefix = [rng.randrange(1000) for _ in range(40)]
    first = prefix + [1, 2, 3, 4, 5]
    assert block_hashes(first, CTX) == _by_definition(first, CTX)
    remembered = len(block_hash._memo)
    second = prefix + [9, 9, 9, 9]
    assert block_hashes(second, CTX) == _by_definition(second, CTX)
    assert len(block_hash._memo) == remembered + 1  # only the new last block was hashed


def test_contexts_and_salts_never_share_a_digest() -> None:
    tokens = list(range(16))
    other = HashContext("memo-model", 4, "bfloat16")
    got = {tuple(block_hashes(tokens, CTX)), tuple(block_hashes(tokens, other)),
           tuple(block_hashes(tokens, CTX, cache_salt="tenant"))}
    assert len(got) == 3
    assert block_hashes(tokens, CTX, cache_salt="tenant") == _by_definition(tokens, CTX,
                                                                           "tenant")


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_hash, "MEMO_ENTRIES", 10)
    for seed in range(5):
        rng = random.Random(seed)
        tokens = [rng.randrange(1000) for _ in range(16)]
        assert block_hashes(tokens, CTX) == _by_definition(tokens, CTX)
        assert len(block_hash._memo) <= 10
