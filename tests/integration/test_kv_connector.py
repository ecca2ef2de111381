"""The KV connector: the engine's own prefix cache first, the store for the rest;
answers saved by the decode worker make a conversation's next turn a cache hit."""

from __future__ import annotations

import random
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.server import wait_until
from services.engine import LLM
from tests.integration.conftest import (
    RunningCluster,
    cluster_settings,
    expected,
    request,
    running_cluster,
)

BS = 16


@pytest.fixture(scope="module")
def one_each(tiny_llama_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    with running_cluster(settings, tmp_path_factory.mktemp("kv-connector")) as rc:
        yield rc



def _blocks_from(port: int, role: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    pattern = (r'^splitserve_kv_connector_blocks_total\{role="' + role +
               r'",source="(\w+)"\} ([0-9.e+]+)$')
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


def _saved_blocks(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^splitserve_kv_connector_saved_blocks_total\{role="\w+"\} (\S+)$', text,
                  re.M)
    return float(m[1]) if m else 0.0


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def test_prefix_held_by_the_engine_is_not_fetched(one_each: RunningCluster,
                                                  reference: LLM) -> None:
    shared = _tokens(5 * BS, 1)
    first, second = shared + _tokens(9, 2), shared + _tokens(12, 3)
    port = one_each.settings.prefill[0].http_port
    want = expected(reference, [first], 6)[0]
    assert one_each.generate(request(first, max_tokens=6)).tokens == want
    before, saved_before = _blocks_from(port, "prefill"), _saved_blocks(port)
    got = one_each.generate(request(second, max_tokens=6))
    after, saved_after = _blocks_from(port, "prefill"), _saved_blocks(port)
    assert got.tokens == expected(reference, [second], 6)[0]
    assert got.usage.cached_tokens == 5 * BS
    assert after.get("engine", 0) - before.get("engine", 0) == 5  # its own prefix cache
    assert after.get("store", 0) - before.get("store", 0) == 0  # nothing from the store
    assert saved_after - saved_before == 1  # the private tail: the store held the 5 shared
    assert wait_until(lambda: one_each.store.stats().pinned_blocks == 0, timeout_s=10)


def test_next_turn_finds_the_answer_in_the_store(one_each: RunningCluster,
                                                 reference: LLM) -> None:
    turn1 = _tokens(3 * BS + 5, 4)
    answer = one_each.generate(request(turn1, max_tokens=40)).tokens
    assert answer == expected(reference, [turn1], 40)[0]
    turn2 = turn1 + answer + _tokens(7, 5)
    port = one_each.settings.prefill[0].http_port
    before = _blocks_from(port, "prefill")
    got = one_each.generate(request(turn2, max_tokens=6))
    after = _blocks_from(port, "prefill")
    assert got.tokens == expected(reference, [turn2], 6)[0]
    # the answer's last token has no KV yet: whole blocks of prompt + answer[:-1]
    assert got.usage.cached_tokens == (len(turn1) + len(answer) - 1) // BS * BS
    assert after.get("store", 0) - before.get("store", 0) >= 2  # the answer's blocks
    assert wait_until(lambda: one_each.store.stats().pinned_blocks == 0, timeout_s=10)


def test_agents_arriving_together_offer_the_shared_prompt_once(one_each: RunningCluster,
                                                               reference: LLM) -> None:
    """8 requests over one 6-block prompt at once: the prefill worker computes and saves
    the prompt once; the others name it as held in the store (pinned, not copied again),
    and the decode worker gets every handed-over block (none computed again)."""
    shared = _tokens(6 * BS, 61)
    prompts = [shared + _tokens(9, 70 + i) for i in range(8)]
    prefill_port = one_each.settings.prefill[0].http_port
    decode_port = one_each.settings.decode[0].http_port
    saved_before, handed_before = _saved_blocks(prefill_port), _blocks_from(decode_port,
                                                                          "decode")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: one_each.generate(request(p, max_tokens=5)), prompts))
    assert [g.tokens for g in got] == expected(reference, prompts, 5)
    assert _saved_blocks(prefill_port) - saved_before == 6 + 8  # the prompt once, 8 tails
    handed = _blocks_from(decode_port, "decode")
    assert sum(handed.values()) - sum(handed_before.values()) == 8 * 7  # 6 full + a tail
    assert wait_until(lambda: one_each.store.stats().pinned_blocks == 0, timeout_s=10)


def test_held_blocks_lost_with_a_store_restart_are_computed_and_saved_again(
        one_each: RunningCluster, reference: LLM) -> None:
    """The store restarts empty while the prefill engine still caches a prompt it sent
    there: the next request over it finds its held blocks gone, hands nothing over (the
    decode worker computes the prompt) and has its engine export again, so the request
    after it saves the prompt anew and hands it over. Tokens equal the reference."""
    shared = _tokens(6 * BS, 81)
    prompts = [shared + _tokens(5, 82 + i) for i in range(3)]
    port = one_each.settings.prefill[0].http_port
    assert one_each.generate(request(prompts[0], max_tokens=4)).tokens == \
        expected(reference, prompts[:1], 4)[0]
    one_each.cluster.kill("kvstore", 0)
    one_each.cluster.start_service("kvstore", 0)
    for p in prompts[1:]:
        saved = _saved_blocks(port)
        assert one_each.generate(request(p, max_tokens=4)).tokens == \
            expected(reference, [p], 4)[0]
    assert _saved_blocks(port) - saved == 6 + 1  # the last request saved the prompt anew
    assert wait_until(lambda: one_each.store.stats().pinned_blocks == 0, timeout_s=10)
