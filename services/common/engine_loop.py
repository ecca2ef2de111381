"""Drives one engine from one thread; gRPC handler threads submit and read streams.

The engine is single-threaded by design: only the loop thread touches it. A
handler submits a request and reads its ``StepOutput``s from a queue; an abort
is just another message to the loop. No torch here: the engine is passed in.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.logging import get_logger


class Engine(Protocol):
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any,
                    **kwargs: Any) -> None: ...
    def step(self) -> list[Any]: ...
    def abort(self, request_id: str) -> bool: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> Any: ...


LOG_STEPS_ENV = "SPLITSERVE_LOG_STEPS"


class EngineStopped(RuntimeError):
    """The loop is shutting down and takes no more work."""


@dataclass
class RequestStream:
    """The outputs of one request, in order; ends with a finished output or an error."""

    request_id: str
    _queue: queue.Queue = field(default_factory=queue.Queue)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def batches(self) -> Iterator[list[Any]]:
        """The outputs in order, each time all that have arrived (at least one): a
        reader that fell behind the engine catches up in one go instead of one
        message per step."""
        while True:
            batch = [self._queue.get()]
            while not _ends(batch[-1]):
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if isinstance(batch[-1], BaseException):
                if len(batch) > 1:
                    yield batch[:-1]
                raise batch[-1]
            yield batch
            if batch[-1].finished:
                return


def _ends(item: Any) -> bool:
    return isinstance(item, BaseException) or item.finished


@dataclass
class _Submit:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: Any
    kwargs: dict[str, Any]


@dataclass
class _AbortStream:
    stream: RequestStream


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine") -> None:
        self._engine = engine
        self._log = get_logger(name)
        self._inbox: queue.Queue[_Submit | _AbortStream | str | None] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stats = engine.stats()
        self._accepting = True
        # a line per step (its wall time, what ran): where a request's time goes
        self._log_steps = os.environ.get(LOG_STEPS_ENV, "") not in ("", "0")
        # with the engine's section timer on, each line splits the step's host time
        self._profiler = getattr(getattr(engine, "runner", None), "profiler", None)
        if self._log_steps and self._profiler is not None:
            self._profiler.enabled = True
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> Any:
        return self._stats

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: Any,
               **kwargs: Any) -> RequestStream:
        if not self._accepting:
            raise EngineStopped("this worker is shutting down")
        stream = RequestStream(request_id)
        self._inbox.put(_Submit(stream, prompt_token_ids, params, kwargs))
        return stream

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Aborts ``request_id``; with ``stream``, only while that stream is the one
        the request runs under (a late abort must not hit the same id submitted again)."""
        self._inbox.put(request_id if stream is None else _AbortStream(stream))

    def stop_accepting(self) -> None:
        self._accepting = False

    def stop(self) -> None:
        self._accepting = False
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            busy = self._engine.has_unfinished()
            try:
                item = self._inbox.get(block=not busy)
                if item is None:
                    break
                self._handle(item)
                continue  # take every pending message before the next step
            except queue.Empty:
                pass
            self._step()
        self._abort_all()

    def _handle(self, item: _Submit | _AbortStream | str) -> None:
        if isinstance(item, _AbortStream):
            rid = item.stream.request_id
            if self._streams.get(rid) is item.stream:
                self._handle(rid)
            return
        if isinstance(item, str):
            if self._engine.abort(item):
                self._finish_aborted(item)
            return
        rid = item.stream.request_id
        if rid in self._streams:
            item.stream._queue.put(ValueError(f"request_id {rid!r} is already running here"))
            return
        try:
            self._engine.add_request(rid, item.prompt_token_ids, item.params, **item.kwargs)
        except Exception as e:  # bad input is the caller's to report
            item.stream._queue.put(e)
            return
        self._streams[rid] = item.stream

    def _step(self) -> None:
        start = time.perf_counter()
        before = dict(self._profiler.seconds) if self._log_steps and self._profiler else {}
        try:
            outputs = self._engine.step()
        except Exception as e:
            self._log.error("engine_step_failed", exc_info=True)
            self._fail_all(e)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._queue.put(out)
            if out.finished:
                del self._streams[out.request_id]
        self._stats = self._engine.stats()
        if self._log_steps:
            self._log_step(time.perf_counter() - start, len(outputs), before)

    def _log_step(self, seconds: float, outputs: int, before: dict[str, float]) -> None:
        parts = {}
        if self._profiler is not None:
            parts = {k: round((v - before.get(k, 0.0)) * 1000, 2)
                     for k, v in self._profiler.seconds.items() if v > before.get(k, 0.0)}
        self._log.info("step", ms=round(seconds * 1000, 2), outputs=outputs,
                       running=self._stats.num_running, waiting=self._stats.num_waiting,
                       **{f"{k}_ms": v for k, v in parts.items()})

    def _finish_aborted(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._queue.put(EngineStopped(f"request {request_id} aborted"))
        self._stats = self._engine.stats()

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            self._engine.abort(rid)
            self._finish_aborted(rid)

    def _fail_all(self, error: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            self._engine.abort(rid)
            stream._queue.put(RuntimeError(f"engine failure: {error}"))
        self._streams.clear()
