"""Preemption: a high-priority request that finds the decode batch full takes the
place of a low-priority one, which pauses and resumes from the store with exactly
the single engine's tokens; nothing leaks. The cluster's policy needs a gap of two
classes (``gateway.preemption.min_class_gap``): one class above waits instead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.server import wait_until
from services.engine import LLM
from splitserve.v1 import common_pb2
from tests.integration.conftest import (
    MODEL_NAME,
    Result,
    RunningCluster,
    cluster_settings,
    collect,
    expected,
    metric,
    request,
    running_cluster,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_seat_pair(tiny_llama_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.model.max_num_seqs = 2  # the decode batch is full with two requests
    settings.gateway.preemption.min_class_gap = 2
    with running_cluster(settings, tmp_path_factory.mktemp("preemption")) as rc:
        yield rc


def _preemptions(cluster: RunningCluster) -> float:
    return metric(cluster.settings.gateway.http_port,
                  rf'splitserve_preemptions_total\{{model="{MODEL_NAME}"\}}')


class Stream(threading.Thread):
    def __init__(self, cluster: RunningCluster, prompt: list[int], max_tokens: int,
                 priority: int) -> None:
        super().__init__()
        self.req = request(prompt, max_tokens=max_tokens)
        self.req.priority = priority
        self.cluster, self.started = cluster, threading.Event()
        self.result: Result | None = None
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        def marked() -> Iterator:
            received = 0
            for msg in self.cluster.stub.Generate(self.req, timeout=120):
                received += len(msg.token_ids)
                if received > 1:  # past the prefill's token: decoding
                    self.started.set()
                yield msg

        try:
            self.result = collect(marked())
        except grpc.RpcError as e:
            self.error = e
        self.ended_at = time.monotonic()


def _two_lows_then_a_high(cluster: RunningCluster, reference: LLM, low_class: int,
                         first: int) -> tuple[list[Stream], Stream]:
    """Two ``low_class`` requests fill the decode batch, then a HIGH one arrives; all
    three get exactly the single engine's tokens. Returns (lows, high), ended."""
    low_prompts = [[first + i] * 20 + list(range(30, 50)) for i in range(2)]
    high_prompt = list(range(first + 100, first + 140))
    want = [*expected(reference, low_prompts, 400), *expected(reference, [high_prompt], 20)]
    lows = [Stream(cluster, p, 400, low_class) for p in low_prompts]
    assert all(s.started.wait(60) for s in lows)
    high = Stream(cluster, high_prompt, 20, common_pb2.PRIORITY_CLASS_HIGH)
    for s in [*lows, high]:
        s.join(timeout=120)
    assert [s.error for s in [*lows, high]] == [None] * 3
    assert [s.result.tokens for s in [*lows, high]] == want  # paused or not, exact
    return lows, high


def _no_pins_left(cluster: RunningCluster) -> bool:
    return wait_until(lambda: (st := cluster.store.stats()).pins == 0 and st.owners == 0,
                      timeout_s=15)


def test_high_priority_takes_the_place_of_a_low_one(one_seat_pair: RunningCluster,
                                                    reference: LLM) -> None:
    before = _preemptions(one_seat_pair)
    lows, high = _two_lows_then_a_high(one_seat_pair, reference,
                                       common_pb2.PRIORITY_CLASS_BATCH, first=7)
    assert high.ended_at < min(s.ended_at for s in lows)  # served first
    assert _preemptions(one_seat_pair) >= before + 1
    assert _no_pins_left(one_seat_pair)


def test_one_class_above_waits_under_a_gap_of_two(one_seat_pair: RunningCluster,
                                                  reference: LLM) -> None:
    before = _preemptions(one_seat_pair)
    lows, high = _two_lows_then_a_high(one_seat_pair, reference,
                                       common_pb2.PRIORITY_CLASS_NORMAL, first=9)
    # waited for a place: it ends about when a low one does (its last tokens come a
    # step after a low's last; the readers' threads may see them in either order),
    # not a second or more before both, as a preempting request does
    assert high.ended_at > min(s.ended_at for s in lows) - 0.2
    assert _preemptions(one_seat_pair) == before
    assert _no_pins_left(one_seat_pair)


def test_decode_worker_swaps_instead_of_recomputing(tiny_llama_dir: Path, tmp_path: Path,
                                                    reference: LLM) -> None:
    """A decode worker whose KV cache cannot hold its four streams preempts inside its
    engine (preemption_mode: swap): the streams still equal the reference, and the
    worker ran each answer token through the model once (no recompute)."""
    settings = cluster_settings(tiny_llama_dir, prefill=1, decode=1)
    settings.model.num_kv_blocks = 16  # 256 token slots for 4 x 150 tokens
    # answers long enough that the four streams overlap on the decode worker even on a
    # loaded machine (with 60 tokens, streams that arrived late found the cache free)
    answer = 120
    prompts = [[11 + i] * 10 + list(range(60 + 20 * i, 80 + 20 * i)) for i in range(4)]
    want = expected(reference, prompts, answer)
    with running_cluster(settings, tmp_path) as rc:
        streams = [Stream(rc, p, answer, common_pb2.PRIORITY_CLASS_NORMAL) for p in prompts]
        for s in streams:
            s.join(timeout=120)
        assert [s.error for s in streams] == [None] * 4
        assert [s.result.tokens for s in streams] == want
        port = rc.settings.decode[0].http_port
        def engine(name: str) -> float:
            return metric(port, rf'splitserve_engine_{name}_total\{{role="decode"\}}')

        assert engine("preemptions") >= 1
        assert engine("swapped_out") == engine("preemptions")
        assert engine("computed_tokens") == 4 * (answer - 1)
        assert wait_until(lambda: rc.store.stats().pins == 0, timeout_s=15)
