"""A discrete-event simulation of a deployment serving a workload (no torch here).

Workers run engine steps whose duration comes from a ``StepModel``: a colocated
worker batches decodes with chunked prefill (as the engine does), a prefill worker
runs prompts and hands them to a decode worker after ``handoff_s``, a decode
worker batches decodes. Requests go to the worker with the fewest outstanding
ones. Prefixes seen before (a shared system prompt, a conversation's history) are
not computed again: per worker when colocated, anywhere (the store) when split.
A deployment on one shared GPU (``shared_gpu``: several worker processes on one device,
as 1 prefill + 1 decode on one card) runs one step at a time: a worker whose step is
ready waits for the device, as kernels of different processes take turns on a GPU
(time slicing, no MPS), modelled as whole steps taking turns.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from bench.plan.step_model import StepModel, StepWork
from bench.serve.metrics import RequestRecord
from bench.serve.workloads import Session


@dataclass(frozen=True)
class Deployment:
    colocated: int = 0
    prefill: int = 0
    decode: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    shared_gpu: bool = False  # every worker a process on one GPU

    @property
    def gpus(self) -> int:
        return 1 if self.shared_gpu else self.colocated + self.prefill + self.decode

    @property
    def name(self) -> str:
        where = " on one GPU" if self.shared_gpu else ""
        if self.colocated:
            return f"colocated x{self.colocated}{where}"
        return f"{self.prefill} prefill + {self.decode} decode{where}"


@dataclass
class _Request:
    session: Session
    turn: int
    arrival: float
    prompt: int  # tokens
    output: int
    cached: int = 0
    computed: int = 0  # prompt tokens whose KV exists (cached or computed)
    emitted: int = 0
    first_token: float = 0.0
    done: float = 0.0
    history_key: tuple = ()

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt


@dataclass
class _Worker:
    kind: str  # colocated | prefill | decode
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    cache: dict = field(default_factory=dict)  # prefix key -> cached tokens

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)


class Simulation:
    def __init__(self, deployment: Deployment, model: StepModel, block_size: int = 16,
                 hop_s: float = 0.0, handoff_s: float = 0.0, step_overhead_s: float = 0.0) -> None:
        d = deployment
        self.d, self.model, self.block_size = d, model, block_size
        self.hop_s, self.handoff_s = hop_s, handoff_s
        self.step_overhead_s = step_overhead_s  # a serving worker's cost around each step
        front = "colocated" if d.colocated else "prefill"
        self.front = [_Worker(front) for _ in range(d.colocated or d.prefill)]
        self.back = [_Worker("decode") for _ in range(d.decode)]
        self.store: dict = {}  # prefixes held by the KV store (split deployments)
        self.events: list = []
        self.order = itertools.count()
        self.turns = itertools.count()
        self.records: list[RequestRecord] = []
        self.device_free_at = 0.0  # shared_gpu: when the one device is done with its step

    def run(self, sessions: list[Session], arrivals: list[float]) -> list[RequestRecord]:
        for session, at in zip(sessions, arrivals, strict=True):
            start = session.arrival_s if session.arrival_s is not None else at
            self._push(start, "arrive", (session, 0, 0))
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(now, payload)
        return self.records

    def _push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (at, next(self.order), kind, payload))

    # ---- events ----
    def _on_arrive(self, now: float, payload: tuple) -> None:
        session, turn, history = payload
        t = session.turns[turn]
        prompt = len(session.prefix) + (history if session.keep_history else 0) + len(t.new_tokens)
        req = _Request(session, turn, now, prompt, t.max_tokens)
        req.history_key = (session.session_id, turn)
        worker = self._least_loaded(self.front)
        held = self.store if self.d.decode else worker.cache
        req.cached = min(self._cached(held, session, turn), prompt - 1)
        req.computed = req.cached
        worker.waiting.append(req)
        self._kick(worker, now)

    def _on_step(self, now: float, payload: tuple) -> None:
        worker, step = payload
        worker.busy = False
        for req, n in step:
            if n == 0:  # a decode
                req.emitted += 1
                if req.emitted == req.output:
                    self._finish(worker, req, now)
                continue
            req.computed += n
            if req.in_prefill:
                continue
            req.emitted, req.first_token = 1, now
            self._remember(worker, req)
            if req.output == 1:
                self._finish(worker, req, now)
            elif worker.kind == "prefill":
                worker.running.remove(req)
                self._push(now + self.handoff_s, "handoff", req)
        self._kick(worker, now)

    def _on_handoff(self, now: float, req: _Request) -> None:
        worker = self._least_loaded(self.back)
        worker.waiting.append(req)
        self._kick(worker, now)

    # ---- workers ----
    def _least_loaded(self, workers: list[_Worker]) -> _Worker:
        """Fewest outstanding requests; ties in turn (as the gateway's router)."""
        start = next(self.turns) % len(workers)
        rotated = workers[start:] + workers[:start]
        return min(rotated, key=lambda w: w.load)

    def _kick(self, worker: _Worker, now: float) -> None:
        if worker.busy or not worker.load:
            return
        step, work = self._form_step(worker)
        if not step:
            return
        worker.busy = True
        start = max(now, self.device_free_at) if self.d.shared_gpu else now
        end = start + self.model.seconds(work)
        self.device_free_at = end
        self._push(end + self.step_overhead_s, "step", (worker, step))

    def _form_step(self, worker: _Worker) -> tuple[list, StepWork]:
        d = self.d
        while worker.waiting and len(worker.running) < d.max_num_seqs:
            worker.running.append(worker.waiting.popleft())
        decodes = [r for r in worker.running if not r.in_prefill]
        budget = d.max_num_batched_tokens - len(decodes)
        step: list = [(r, 0) for r in decodes]
        tokens = attention = 0
        for r in worker.running:
            if r.in_prefill and budget > 0:
                n = min(r.prompt - r.computed, budget)
                step.append((r, n))
                budget -= n
                tokens += n
                attention += n * (r.computed + n)
        context = sum(r.prompt + r.emitted for r in decodes)
        return step, StepWork(tokens, attention, len(decodes), context)

    def _finish(self, worker: _Worker, req: _Request, now: float) -> None:
        worker.running.remove(req)
        req.done = now
        self.records.append(RequestRecord(
            req.session.session_id, req.turn, req.arrival, req.prompt, req.output, req.cached,
            ttft_s=req.first_token - req.arrival + self.hop_s,
            e2e_s=req.done - req.arrival + self.hop_s,
        ))
        nxt = req.turn + 1
        if nxt < len(req.session.turns):
            history = req.prompt - len(req.session.prefix) + req.output
            self._push(now + self.hop_s, "arrive", (req.session, nxt, history))

    # ---- prefix reuse ----
    def _cached(self, held: dict, session: Session, turn: int) -> int:
        best = held.get(("prefix", id(session.prefix)), 0) if session.prefix else 0
        if session.keep_history and turn:
            best = max(best, held.get((session.session_id, turn - 1), 0))
        return best

    def _remember(self, worker: _Worker, req: _Request) -> None:
        held = self.store if self.d.decode else worker.cache
        bs = self.block_size
        if req.session.prefix:
            held[("prefix", id(req.session.prefix))] = len(req.session.prefix) // bs * bs
        if req.session.keep_history:
            held[req.history_key] = (req.prompt + req.output) // bs * bs
