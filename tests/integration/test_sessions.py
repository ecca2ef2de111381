"""Sessions: a finished turn's KV stays pinned in the store under its session, the next
turn computes only its new tokens, and an explicit end or the TTL lets it go; one
tenant cannot end another's session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.launcher import free_port
from services.common.server import wait_until
from services.engine import LLM
from tests.integration.conftest import (
    Result,
    RunningCluster,
    cluster_settings,
    collect,
    expected,
    request,
    running_cluster,
)

pytestmark = pytest.mark.slow
TTL_S = 4.0
MAX_BLOCKS = 6  # per client
KEY_A, KEY_B = "session-key-a", "session-key-b"


@pytest.fixture(scope="module")
def keyed_pair(tiny_llama_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1, session_ttl_s=TTL_S,
                                api_keys=[KEY_A, KEY_B], openai_port=free_port(),
                                session_max_blocks=MAX_BLOCKS)
    with running_cluster(settings, tmp_path_factory.mktemp("sessions")) as rc:
        yield rc


def turn(cluster: RunningCluster, key: str, prompt: list[int], max_tokens: int,
         session: str, end: bool = False) -> Result:
    req = request(prompt, max_tokens=max_tokens)
    req.session_id, req.end_session = session, end
    return collect(cluster.stub.Generate(req, timeout=60, metadata=(("x-api-key", key),)))


def held(cluster: RunningCluster, owners: int, pins: int) -> bool:
    """The store's pins come to exactly this (the requests' own pins are let go)."""
    def now() -> bool:
        s = cluster.store.stats()
        return (s.owners, s.pins) == (owners, pins)
    return wait_until(now, timeout_s=10)


def test_the_next_turn_computes_only_its_new_tokens(keyed_pair: RunningCluster,
                                                    reference: LLM) -> None:
    bs = keyed_pair.settings.model.block_size
    # 40 prompt + 9 answer tokens: KV for 48 (the last token's never ran) = 3 full blocks
    p1 = list(range(40, 80))
    first = turn(keyed_pair, KEY_A, p1, 9, "chat-1")
    assert first.tokens == expected(reference, [p1], 9)[0]
    kv_tokens = len(p1) + len(first.tokens) - 1
    assert kv_tokens % bs == 0 and held(keyed_pair, owners=1, pins=kv_tokens // bs)

    # Another tenant naming the same session ends nothing of it.
    turn(keyed_pair, KEY_B, list(range(200, 220)), 1, "chat-1", end=True)
    assert held(keyed_pair, owners=1, pins=kv_tokens // bs)

    p2 = p1 + first.tokens + list(range(300, 310))
    second = turn(keyed_pair, KEY_A, p2, 8, "chat-1")
    assert second.tokens == expected(reference, [p2], 8)[0]
    # Computed: the 10 new tokens and the last answer token, nothing of turn one.
    assert second.usage.cached_tokens == kv_tokens
    assert len(p2) - second.usage.cached_tokens == 10 + 1
    grown = (len(p2) + len(second.tokens) - 1) // bs
    assert held(keyed_pair, owners=1, pins=grown)

    p3 = p2 + second.tokens + list(range(320, 330))
    last = turn(keyed_pair, KEY_A, p3, 4, "chat-1", end=True)
    assert last.usage.cached_tokens == grown * bs
    assert held(keyed_pair, owners=0, pins=0)


def test_an_idle_session_lets_go_after_its_ttl(keyed_pair: RunningCluster) -> None:
    turn(keyed_pair, KEY_B, list(range(100, 140)), 9, "agent-7")
    assert held(keyed_pair, owners=1, pins=3)
    assert wait_until(lambda: (s := keyed_pair.store.stats()).pins == 0 and s.owners == 0,
                      timeout_s=TTL_S + 10)


def test_sessions_through_the_openai_front(keyed_pair: RunningCluster) -> None:
    """``session_id`` / ``end_session`` as extras of the official client: the second
    turn finds the first one's KV; ending the session lets it go."""
    import openai

    base = f"http://127.0.0.1:{keyed_pair.settings.gateway.openai_port}/v1"
    with openai.OpenAI(base_url=base, api_key=KEY_A, max_retries=0, timeout=30) as client:
        def complete(prompt: list[int], end: bool) -> openai.types.Completion:
            return client.completions.create(
                model=keyed_pair.settings.model.name, prompt=prompt, max_tokens=9,
                temperature=0.0, extra_body={"ignore_eos": True, "session_id": "oa-1",
                                             "end_session": end, "return_token_ids": True})

        p1 = list(range(400, 440))
        first = complete(p1, end=False)
        answer = first.choices[0].model_extra["token_ids"]
        assert held(keyed_pair, owners=1, pins=3)
        second = complete(p1 + answer + list(range(450, 460)), end=True)
        assert second.usage.prompt_tokens_details.cached_tokens == 48
    assert held(keyed_pair, owners=0, pins=0)


def test_a_client_over_its_session_blocks_lets_its_oldest_session_go(
        keyed_pair: RunningCluster) -> None:
    for i, name in enumerate(("s-a", "s-b")):
        turn(keyed_pair, KEY_B, list(range(100 + 50 * i, 140 + 50 * i)), 9, name)
    assert held(keyed_pair, owners=2, pins=6)  # 3 blocks each: at the cap
    turn(keyed_pair, KEY_A, list(range(300, 340)), 9, "other-client")  # not counted
    turn(keyed_pair, KEY_B, list(range(200, 240)), 9, "s-c")
    assert held(keyed_pair, owners=3, pins=9)  # s-a let go: 6 for KEY_B, 3 for KEY_A
    for key, name in ((KEY_B, "s-b"), (KEY_B, "s-c"), (KEY_A, "other-client")):
        turn(keyed_pair, key, [7], 1, name, end=True)
    assert held(keyed_pair, owners=0, pins=0)
