"""Workloads of `splitserve bench serve`: what to ask, as token ids (no torch).

A workload is a list of sessions; a session is one or more turns sent one after
the other (the next turn's prompt may depend on the previous answer). Single-turn
workloads are sessions of one turn. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# ShareGPT-like lengths (log-normal, in tokens): means close to what serving papers
# report for ShareGPT conversations with a Llama tokenizer; heavy right tails.
SHAREGPT_INPUT_MEAN, SHAREGPT_INPUT_SIGMA = 230.0, 1.0
SHAREGPT_OUTPUT_MEAN, SHAREGPT_OUTPUT_SIGMA = 330.0, 0.8


@dataclass
class Turn:
    new_tokens: list[int]  # appended to the session's history (or the whole prompt)
    max_tokens: int


@dataclass
class Session:
    session_id: str
    turns: list[Turn]
    prefix: list[int] = field(default_factory=list)  # shared system prompt, if any
    keep_history: bool = False  # multi-turn: prompt = prefix + all turns + answers so far
    arrival_s: float | None = None  # from a trace: when the first turn is sent

    def prompt(self, turn: int, history: list[int]) -> list[int]:
        if self.keep_history:
            return self.prefix + history + self.turns[turn].new_tokens
        return self.prefix + self.turns[turn].new_tokens


@dataclass
class WorkloadSpec:
    kind: str = "random"  # random | sharegpt-like | shared-prefix | multi-turn | trace
    num: int = 100  # sessions (requests for single-turn kinds)
    input_len: tuple[int, int] = (64, 512)  # uniform range, random kind
    output_len: tuple[int, int] = (32, 256)
    prefix_len: int = 1024  # shared-prefix: system prompt tokens
    groups: int = 4  # shared-prefix: distinct system prompts
    turns: int = 3  # multi-turn and shared-prefix: turns per session
    max_len: int = 4096  # no prompt + output longer than this
    token_range: tuple[int, int] = (3, 255)  # token ids drawn from [lo, hi]
    trace: str | None = None
    seed: int = 0


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that the mean is ``mean``
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def _tokens(rng: random.Random, n: int, spec: WorkloadSpec) -> list[int]:
    lo, hi = spec.token_range
    return [rng.randint(lo, hi) for _ in range(n)]


def _random(rng: random.Random, spec: WorkloadSpec) -> list[Session]:
    return [
        Session(f"s{i}", [Turn(_tokens(rng, rng.randint(*spec.input_len), spec),
                               rng.randint(*spec.output_len))])
        for i in range(spec.num)
    ]


def _sharegpt(rng: random.Random, spec: WorkloadSpec) -> list[Session]:
    sessions = []
    for i in range(spec.num):
        n_in = _lognormal(rng, SHAREGPT_INPUT_MEAN, SHAREGPT_INPUT_SIGMA, 4, spec.max_len // 2)
        n_out = _lognormal(rng, SHAREGPT_OUTPUT_MEAN, SHAREGPT_OUTPUT_SIGMA, 4,
                           spec.max_len - n_in)
        sessions.append(Session(f"s{i}", [Turn(_tokens(rng, n_in, spec), n_out)]))
    return sessions


def _shared_prefix(rng: random.Random, spec: WorkloadSpec) -> list[Session]:
    prefixes = [_tokens(rng, spec.prefix_len, spec) for _ in range(spec.groups)]
    return [
        Session(f"agent{i}", [Turn(_tokens(rng, rng.randint(*spec.input_len), spec),
                                   rng.randint(*spec.output_len)) for _ in range(spec.turns)],
                prefix=prefixes[i % spec.groups])
        for i in range(spec.num)
    ]


def _multi_turn(rng: random.Random, spec: WorkloadSpec) -> list[Session]:
    return [
        Session(f"chat{i}", [Turn(_tokens(rng, rng.randint(*spec.input_len), spec),
                                  rng.randint(*spec.output_len)) for _ in range(spec.turns)],
                keep_history=True)
        for i in range(spec.num)
    ]


def _trace(rng: random.Random, spec: WorkloadSpec) -> list[Session]:
    """JSONL lines of {"arrival_s", "input_len", "output_len", optional "prefix_group"}."""
    if not spec.trace:
        raise ValueError("--workload trace needs --trace FILE")
    path = Path(spec.trace)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    prefixes: dict[object, list[int]] = {}
    sessions = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            arrival, n_in, n_out = float(rec["arrival_s"]), int(rec["input_len"]), int(
                rec["output_len"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: need arrival_s, input_len, output_len ({e})") from e
        group = rec.get("prefix_group")
        prefix = []
        if group is not None:
            prefix = prefixes.setdefault(group, _tokens(rng, spec.prefix_len, spec))
        sessions.append(Session(f"t{n}", [Turn(_tokens(rng, n_in, spec), n_out)],
                                prefix=prefix, arrival_s=arrival))
    return sessions


GENERATORS: dict[str, Callable[[random.Random, WorkloadSpec], list[Session]]] = {
    "random": _random,
    "sharegpt-like": _sharegpt,
    "shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
    "trace": _trace,
}


def make_workload(spec: WorkloadSpec) -> list[Session]:
    if spec.kind not in GENERATORS:
        raise ValueError(f"unknown workload {spec.kind!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[spec.kind](random.Random(spec.seed), spec)
