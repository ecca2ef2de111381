"""A cluster whose store has a tiny cpu tier over a disk tier: prompts whose prefix
blocks were demoted to disk are served from there, with the single engine's tokens,
and nothing stays pinned."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams
from tests.integration.conftest import RunningCluster, cluster_settings, request, running_cluster

pytestmark = pytest.mark.slow
BLOCK_BYTES = 8192  # tiny-llama: 2 layers x K,V x 16 tokens x 2 heads x 16 dims x 4 bytes


@pytest.fixture(scope="module", params=["grpc", "shm"])
def tiered(request: pytest.FixtureRequest, tiny_llama_dir: Path,
           tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp(f"tiers-{request.param}")
    settings = cluster_settings(tiny_llama_dir, transport=request.param)
    settings.kvstore.tiers = [{"kind": "cpu", "bytes": 20 * BLOCK_BYTES},
                              {"kind": "disk", "bytes": "64MiB", "path": str(tmp / "kv")}]
    with running_cluster(settings, tmp) as rc:
        yield rc



def tiers(rc: RunningCluster) -> dict:
    return {t.tier: t for t in rc.store.stats().tiers}


def test_prefixes_demoted_to_disk_are_served_from_there(tiered: RunningCluster,
                                                        reference: LLM) -> None:
    rng = random.Random(tiered.settings.transfer.transport)
    prefix = [rng.randrange(3, 500) for _ in range(64)]  # 4 full blocks
    fillers = [[rng.randrange(3, 500) for _ in range(80)] for _ in range(8)]
    later = [prefix + [10, 11, 12, 13], prefix + [20, 21]]
    prompts = [prefix + [7, 8, 9], *fillers, *later]
    want = [o["token_ids"] for o in reference.generate(
        prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)]
    got = [tiered.generate(request(ids, max_tokens=6)) for ids in prompts[:-2]]
    before = tiers(tiered)
    assert before["cpu"].demotions > 0 and before["disk"].blocks > 0  # pushed down
    got += [tiered.generate(request(ids, max_tokens=6)) for ids in later]
    assert [g.tokens for g in got] == want
    assert all(g.usage.cached_tokens == 64 for g in got[-2:])
    after = tiers(tiered)
    assert after["disk"].hits - before["disk"].hits >= 4  # the prefix came off the disk
    assert after["cpu"].promotions > before["cpu"].promotions
    assert after["disk"].checksum_failures == 0
    deadline = time.monotonic() + 10
    while tiered.store.stats().pins and time.monotonic() < deadline:
        time.sleep(0.05)
    s = tiered.store.stats()
    assert (s.pins, s.pinned_blocks, s.owners) == (0, 0, 0)
