"""Runs a workload against a backend: sessions start on their arrival times (or as
a closed loop of clients), turns of a session one after the other."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from bench.serve.backends import Backend, Outcome
from bench.serve.metrics import RequestRecord
from bench.serve.workloads import Session


def _record(session: Session, turn: int, sent: float, prompt: list[int],
            out: Outcome) -> RequestRecord:
    times = out.token_times
    return RequestRecord(
        session_id=session.session_id, turn=turn, sent_s=sent,
        prompt_tokens=out.prompt_tokens or len(prompt), output_tokens=out.output_tokens,
        cached_tokens=out.cached_tokens,
        ttft_s=times[0] if times else 0.0, e2e_s=times[-1] if times else 0.0,
        itl_s=[b - a for a, b in zip(times, times[1:], strict=False)],
        ok=out.ok and bool(times), error=out.error or ("" if times else "no tokens"),
    )


class Driver:
    def __init__(self, backend: Backend, max_len: int, on_done: Callable[[], None],
                 seed: int = 0) -> None:
        self.backend = backend
        self.max_len = max_len
        self.on_done = on_done
        self.records: list[RequestRecord] = []
        self.cut_short = 0  # multi-turn sessions stopped where the history got too long
        self._rng = random.Random(seed)
        self._start = 0.0

    async def run(self, sessions: list[Session], arrivals: list[float] | None,
                  concurrency: int) -> float:
        """Returns the run's duration in seconds."""
        self._start = time.perf_counter()
        if arrivals is None:
            await self._closed_loop(sessions, concurrency)
        else:
            await self._open_loop(sessions, arrivals)
        return time.perf_counter() - self._start

    async def _open_loop(self, sessions: list[Session], arrivals: list[float]) -> None:
        tasks = []
        for session, at in zip(sessions, arrivals, strict=True):
            at = session.arrival_s if session.arrival_s is not None else at
            delay = at - (time.perf_counter() - self._start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._session(session)))
        await asyncio.gather(*tasks)

    async def _closed_loop(self, sessions: list[Session], concurrency: int) -> None:
        queue = list(reversed(sessions))

        async def client() -> None:
            while queue:
                await self._session(queue.pop())

        await asyncio.gather(*(client() for _ in range(max(1, concurrency))))

    async def _session(self, session: Session) -> None:
        history: list[int] = []
        for i, turn in enumerate(session.turns):
            prompt = session.prompt(i, history)
            if len(prompt) + turn.max_tokens > self.max_len:
                self.cut_short += 1
                break
            sent = time.perf_counter() - self._start
            last = i == len(session.turns) - 1
            out = await self.backend.generate(prompt, turn.max_tokens, session.session_id, last)
            self.records.append(_record(session, i, sent, prompt, out))
            self.on_done()
            if not out.ok:
                break
            # text-only backends give no ids: the history continues with stand-ins
            answer = out.token_ids or [self._rng.randint(3, 255)
                                       for _ in range(out.output_tokens)]
            history += turn.new_tokens + answer
