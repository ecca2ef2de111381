"""splitserve plan: the step model fits, the simulation follows the engine's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.plan.search import candidates, max_rate
from bench.plan.simulator import Deployment, Simulation
from bench.plan.step_model import StepModel, StepWork
from bench.serve.metrics import Slo
from bench.serve.workloads import Session, Turn, WorkloadSpec, make_workload

FLAT = StepModel(base=0.010, per_token=0.0, per_attention=0.0, per_seq=0.0, per_context=0.0)


def _session(name: str, prompt: int, output: int, prefix: list[int] | None = None) -> Session:
    return Session(name, [Turn([5] * prompt, output)], prefix=prefix or [])


def test_fit_recovers_a_known_model() -> None:
    truth = StepModel(0.003, 2e-5, 1e-8, 3e-4, 2e-7)
    works = [StepWork(t, t * t, 0, 0) for t in (16, 64, 256, 1024)]
    works += [StepWork(0, 0, b, b * c) for b in (1, 4, 16) for c in (64, 512)]
    fitted = StepModel.fit([(w, truth.seconds(w)) for w in works])
    for w in works:
        assert fitted.seconds(w) == pytest.approx(truth.seconds(w), rel=1e-6)


def test_one_request_colocated_and_split() -> None:
    one = [_session("a", 100, 5)]
    co = Simulation(Deployment(colocated=1), FLAT, hop_s=0.002).run(one, [0.0])[0]
    assert co.ttft_s == pytest.approx(0.012)  # one prefill step + the hop
    assert co.tpot_s == pytest.approx(0.010)  # then one step per token
    split = Simulation(Deployment(prefill=1, decode=1), FLAT, handoff_s=0.003).run(one, [0.0])[0]
    assert split.ttft_s == pytest.approx(0.010)
    assert split.e2e_s == pytest.approx(0.010 + 0.003 + 4 * 0.010)


def test_chunked_prefill_takes_several_steps() -> None:
    d = Deployment(colocated=1, max_num_batched_tokens=64)
    rec = Simulation(d, FLAT).run([_session("a", 200, 1)], [0.0])[0]
    assert rec.ttft_s == pytest.approx(4 * 0.010)  # 64 + 64 + 64 + 8 tokens


def test_a_long_prefill_slows_colocated_decodes_not_split_ones() -> None:
    model = StepModel(0.001, 1e-5, 0.0, 0.0, 0.0)
    sessions = [_session("short", 10, 30), _session("long", 2000, 2)]
    arrivals = [0.0, 0.005]

    def tpot_of_short(d: Deployment) -> float:
        records = Simulation(d, model).run(sessions, arrivals)
        return next(r for r in records if r.session_id == "short").tpot_s

    assert tpot_of_short(Deployment(colocated=1)) > 1.3 * tpot_of_short(
        Deployment(prefill=1, decode=1))


def test_shared_prefix_is_computed_once_per_holder() -> None:
    prefix = [9] * 64
    sessions = [_session(f"s{i}", 8, 1, prefix) for i in range(3)]
    co = Simulation(Deployment(colocated=2), FLAT).run(sessions, [0.0, 1.0, 2.0])
    split = Simulation(Deployment(prefill=2, decode=1), FLAT).run(sessions, [0.0, 1.0, 2.0])
    assert [r.cached_tokens for r in split] == [0, 64, 64]  # the store serves every worker
    assert sorted(r.cached_tokens for r in co) == [0, 0, 64]  # each worker has its own cache


def test_multi_turn_history_grows_and_is_cached() -> None:
    sessions = make_workload(WorkloadSpec(kind="multi-turn", num=1, turns=3,
                                          input_len=(20, 20), output_len=(12, 12)))
    records = Simulation(Deployment(colocated=1), FLAT).run(sessions, [0.0])
    assert [r.prompt_tokens for r in records] == [20, 52, 84]
    assert [r.cached_tokens for r in records] == [0, 32, 64]  # whole blocks of the history


def test_search_covers_every_split_and_finds_a_rate() -> None:
    names = {d.name for d in candidates(3, 64, 2048)}
    assert names == {"colocated x1", "colocated x2", "colocated x3", "1 prefill + 1 decode",
                     "1 prefill + 2 decode", "2 prefill + 1 decode"}
    sessions = make_workload(WorkloadSpec(num=60, input_len=(32, 64), output_len=(4, 8)))
    pred = max_rate(Deployment(colocated=1), FLAT, sessions, Slo(1.0, 0.5), 0.9)
    assert pred.rate > 1.0 and pred.goodput > 0


def test_on_one_gpu_the_workers_steps_take_turns() -> None:
    sessions = [_session("a", 100, 1), _session("b", 100, 3)]
    split = Deployment(prefill=1, decode=1)
    shared = Deployment(prefill=1, decode=1, shared_gpu=True)
    assert (shared.gpus, shared.name) == (1, "1 prefill + 1 decode on one GPU")
    # a's prefill, then b's, then b's two decode steps: never two steps at once, so sharing
    # the device changes nothing
    apart = Simulation(split, FLAT).run(sessions, [0.0, 0.005])
    together = Simulation(shared, FLAT).run(sessions, [0.0, 0.005])
    assert [r.e2e_s for r in apart] == [r.e2e_s for r in together]  # never both busy
    # s0 is handed over at 0.010 while s1-s3 prefill: on its own GPU the decode worker
    # starts at once, on the shared one after that prefill step
    busy = [_session(f"s{i}", 100, 20) for i in range(4)]
    times = [0.0, 0.001, 0.002, 0.003]

    def s0(d: Deployment) -> float:
        return next(r.e2e_s for r in Simulation(d, FLAT).run(busy, times) if r.session_id == "s0")

    assert s0(split) == pytest.approx(0.010 + 19 * 0.010)
    assert s0(shared) == pytest.approx(0.020 + 19 * 0.010)


def test_plan_takes_the_engine_from_a_cluster_yaml(tmp_path: Path) -> None:
    import argparse

    from bench.plan import add_arguments, engine_model, parse_deployment

    config = tmp_path / "c.yaml"
    config.write_text("model: {path: dummy:qwen3-0.6b, device: cuda, dtype: bfloat16, "
                      "max_num_seqs: 32, kv_cache_memory_gb: 20}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = engine_model(parser.parse_args(["--config", str(config),
                                            "--max-num-batched-tokens", "4096"]))
    assert (model.path, model.device, model.kv_cache_memory_gb) == ("dummy:qwen3-0.6b", "cuda",
                                                                    20)
    d = parse_deployment("1+1", model, one_gpu=True)
    assert (d.max_num_seqs, d.max_num_batched_tokens, d.shared_gpu) == (32, 4096, True)
    plain = engine_model(parser.parse_args(["--device", "cuda"]))
    assert (plain.path, plain.dtype, plain.max_model_len) == ("dummy:tiny-llama", "bfloat16",
                                                             1024)
