"""Routing policies: which worker of a pool serves a request.

A :class:`Router` sees the candidate workers of one pool (the prefill or the decode
workers of one model) and a :class:`RouteRequest`, skips the unhealthy ones and
picks one; :meth:`Router.on_start` / :meth:`Router.on_finish` tell it what this
gateway has in flight where. Policies:

* ``round_robin``: the next healthy worker after the last one picked, in id order.
* ``least_loaded``: the lowest load: requests in flight there + queued prompt
  tokens (in units of ``token_weight`` tokens) + KV fullness for decode workers.
* ``kv_aware``: least_loaded plus the prompt work a worker would still do: the
  tokens it must compute (after the longest run of the request's leading block
  hashes, :func:`services.engine.block_hash.block_hashes`, that its prefix cache
  holds, or the store holds) and the blocks it must fetch from the store (each
  ``store_block_cost`` of computing one), in units of ``token_weight`` tokens.
  What a worker holds comes from its KV events (``prefix_hits``, the gateway's
  :class:`~gateway.kv_index.KVIndex`), else from what this gateway sent it.

Thread-safe: the gateway serves requests from many threads. No worker at all
-> :class:`NoHealthyWorkerError`, which the server answers with UNAVAILABLE.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import Counter

from splitserve.v1 import worker_pb2

PREFILL = "prefill"
DECODE = "decode"
ROUTED = Counter("splitserve_routed_requests", "Requests sent to each worker, by phase",
                 ["phase", "worker"])
BlockNamer = Callable[[Sequence[int], str], tuple[bytes, ...]]


@dataclass
class WorkerInfo:
    """One worker as the gateway knows it: identity, health, last reported load."""

    worker_id: str
    address: str
    role: str  # "prefill" | "decode"
    model: str = ""  # "" -> serves any model
    healthy: bool = True
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    max_num_seqs: int = 0  # 0: not reported
    load_seq: int = 0  # counts the load reports taken in (tells a stale one from a new)

    def update_load(self, load: worker_pb2.WorkerLoad) -> None:
        """Takes in a worker's ``GetLoad`` answer."""
        self.load_seq += 1
        self.running = load.running
        self.waiting = load.waiting
        self.queued_tokens = load.queued_tokens
        self.free_kv_blocks = load.free_kv_blocks
        self.total_kv_blocks = load.total_kv_blocks
        self.max_num_seqs = load.max_num_seqs
        if load.model:
            self.model = load.model

    def serves(self, model: str) -> bool:
        """Whether a request for ``model`` ("" -> any) may go here."""
        return not model or self.model in ("", model)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at to place a request."""

    request_id: str
    model: str = ""
    num_tokens: int = 0  # prompt tokens (prefill) or tokens of KV to hold (decode)
    block_hashes: tuple[bytes, ...] = ()  # the prompt's full-block hashes, in order
    block_size: int = 16
    store_blocks: int = 0  # leading blocks of block_hashes the KV store holds
    priority: int = 0
    phase: str = PREFILL  # "prefill" | "decode": which pool is being picked from


class NoHealthyWorkerError(RuntimeError):
    """No healthy worker can take the request: the server answers UNAVAILABLE."""

    def __init__(self, phase: str, model: str, total: int) -> None:
        what = f"{phase} worker" + (f" for model {model!r}" if model else "")
        if total == 0:
            msg = f"no {what} is registered"
        else:
            msg = f"no healthy {what}: all {total} are unhealthy; retry later"
        super().__init__(msg)
        self.phase = phase
        self.model = model


@dataclass
class _Load:
    inflight: int = 0
    tokens: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # request_id -> tokens added


class Router(ABC):
    """A routing policy. Subclasses implement :meth:`choose`; the base filters
    candidates and keeps the per-worker in-flight bookkeeping."""

    name: ClassVar[str] = ""
    uses_block_hashes: ClassVar[bool] = False

    def __init__(self, token_weight: int = 512, kv_weight: float = 4.0) -> None:
        self.token_weight = max(1, token_weight)  # this many queued tokens count as one request
        self.kv_weight = kv_weight  # a full KV cache counts as this many requests
        self._lock = threading.Lock()
        self._loads: dict[str, _Load] = {}

    def name_blocks(self, namer: BlockNamer, token_ids: Sequence[int],
                    cache_salt: str = "") -> tuple[bytes, ...]:
        """The prompt's block hashes by ``namer`` (the request's model names them: model id,
        block size, dtype), named once per request (the flow puts them in its prefill
        RouteRequest); () when this policy does not look at them."""
        return namer(token_ids, cache_salt) if self.uses_block_hashes else ()

    # -- the interface -------------------------------------------------------------------

    def pick(self, candidates: Sequence[WorkerInfo], request: RouteRequest) -> WorkerInfo:
        """A healthy worker of ``candidates`` serving ``request.model``; raises
        :class:`NoHealthyWorkerError` when there is none."""
        pool = [w for w in candidates if w.serves(request.model)]
        healthy = [w for w in pool if w.healthy]
        if not healthy:
            raise NoHealthyWorkerError(request.phase, request.model, len(pool))
        healthy.sort(key=lambda w: w.worker_id)
        with self._lock:
            return self.choose(healthy, request)

    def on_start(self, worker: WorkerInfo, request: RouteRequest) -> None:
        """``request`` was sent to ``worker`` (call once per phase, before the RPC)."""
        with self._lock:
            load = self._loads.setdefault(worker.worker_id, _Load())
            if request.request_id in load.requests:
                return
            load.requests[request.request_id] = request.num_tokens
            load.inflight += 1
            load.tokens += request.num_tokens
            ROUTED.labels(request.phase, worker.worker_id).inc()
            self._started(worker, request)

    def on_finish(self, worker: WorkerInfo, request: RouteRequest) -> None:
        """``worker`` is done with ``request`` (finished, failed or aborted); idempotent."""
        with self._lock:
            load = self._loads.get(worker.worker_id)
            if load is None or request.request_id not in load.requests:
                return
            load.tokens -= load.requests.pop(request.request_id)
            load.inflight -= 1

    def forget(self, worker_id: str) -> None:
        """Drops all bookkeeping of a worker that left the cluster."""
        with self._lock:
            self._loads.pop(worker_id, None)
            self._forgotten(worker_id)

    def inflight(self, worker_id: str) -> int:
        with self._lock:
            load = self._loads.get(worker_id)
            return load.inflight if load else 0

    def snapshot(self) -> dict[str, dict[str, int]]:
        """worker_id -> {"inflight", "tokens"} sent by this gateway (for metrics)."""
        with self._lock:
            return {k: {"inflight": v.inflight, "tokens": v.tokens} for k, v in self._loads.items()}

    # -- for subclasses (called under the lock) --------------------------------------------

    @abstractmethod
    def choose(self, healthy: list[WorkerInfo], request: RouteRequest) -> WorkerInfo:
        """Picks one of ``healthy`` (non-empty, sorted by worker_id)."""

    def _started(self, worker: WorkerInfo, request: RouteRequest) -> None:  # noqa: B027
        """Hook: ``request`` went to ``worker``."""

    def _forgotten(self, worker_id: str) -> None:  # noqa: B027
        """Hook: ``worker_id`` left."""

    def load_score(self, worker: WorkerInfo) -> float:
        """Requests in flight + queued tokens / token_weight (+ KV fullness for decode).
        What this gateway sent and what the worker last reported are combined with
        max, so neither a stale report nor other gateways' traffic is missed."""
        local = self._loads.get(worker.worker_id) or _Load()
        requests = max(local.inflight, worker.running + worker.waiting)
        tokens = max(local.tokens, worker.queued_tokens)
        score = requests + tokens / self.token_weight
        if worker.role == DECODE and worker.total_kv_blocks > 0:
            used = 1.0 - worker.free_kv_blocks / worker.total_kv_blocks
            score += self.kv_weight * min(max(used, 0.0), 1.0)
        return score


class RoundRobinRouter(Router):
    name = "round_robin"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: dict[tuple[str, str], str] = {}

    def choose(self, healthy: list[WorkerInfo], request: RouteRequest) -> WorkerInfo:
        key = (request.phase, request.model)
        last = self._last.get(key)
        chosen = healthy[0]
        if last is not None:
            chosen = next((w for w in healthy if w.worker_id > last), healthy[0])
        self._last[key] = chosen.worker_id
        return chosen


class LeastLoadedRouter(Router):
    name = "least_loaded"

    def choose(self, healthy: list[WorkerInfo], request: RouteRequest) -> WorkerInfo:
        return min(healthy, key=lambda w: (self.load_score(w), w.worker_id))


PrefixHits = Callable[[WorkerInfo, Sequence[bytes]], int]


class KVAwareRouter(Router):
    """least_loaded, plus the prompt work left to the worker after its cache and the store.

    By default a worker is assumed to hold the blocks of the prompts this gateway
    sent it (the last ``max_hashes_per_worker`` of them); pass ``prefix_hits`` to
    ask something better (the workers' own KV events)."""

    name = "kv_aware"
    uses_block_hashes = True

    def __init__(
        self,
        prefix_hits: PrefixHits | None = None,
        max_hashes_per_worker: int = 65536,
        store_block_cost: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._prefix_hits = prefix_hits
        self.store_block_cost = store_block_cost
        self._max = max_hashes_per_worker
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    def hit_blocks(self, worker: WorkerInfo, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` ``worker`` holds."""
        if self._prefix_hits is not None:
            return self._prefix_hits(worker, hashes)
        held = self._held.get(worker.worker_id)
        n = 0
        if held:
            for h in hashes:
                if h not in held:
                    break
                n += 1
        return n

    def choose(self, healthy: list[WorkerInfo], request: RouteRequest) -> WorkerInfo:
        return min(healthy, key=lambda w: (self.cost(w, request), w.worker_id))

    def cost(self, worker: WorkerInfo, request: RouteRequest) -> float:
        """Load + (tokens to compute + store fetches) / token_weight."""
        local = self.hit_blocks(worker, request.block_hashes) if request.block_hashes else 0
        fetched = max(0, request.store_blocks - local)
        total = max(request.num_tokens, len(request.block_hashes) * request.block_size)
        compute = max(0, total - (local + fetched) * request.block_size)
        work = compute + fetched * request.block_size * self.store_block_cost
        return self.load_score(worker) + work / self.token_weight

    def _started(self, worker: WorkerInfo, request: RouteRequest) -> None:
        if not request.block_hashes:
            return
        held = self._held.setdefault(worker.worker_id, OrderedDict())
        for h in request.block_hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self._max:
            held.popitem(last=False)

    def _forgotten(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)


ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (RoundRobinRouter, LeastLoadedRouter, KVAwareRouter)
}


def make_router(name: str, **kwargs: Any) -> Router:
    """The policy called ``name`` (``round_robin``, ``least_loaded``, ``kv_aware``)."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(ROUTERS))}")
    return cls(**kwargs)
