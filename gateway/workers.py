"""The gateway's view of its workers: stubs, health and load, polled on the event loop.

Every ``poll_s`` each worker is asked ``GetLoad`` with a ``poll_timeout_s`` deadline.
A worker that refuses connections is down at once; one that stops answering (hung,
SIGSTOPped) is down after ``failures_to_down`` polls in a row time out, and then
every call in flight on it is interrupted (its flow then moves the request to another
worker, or fails it with UNAVAILABLE) instead of hanging.
``on_change`` is called whenever the set of healthy workers changes (readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.router import DECODE, PREFILL, WorkerInfo
from services.common.logging import get_logger
from services.common.server import GRPC_OPTIONS
from services.common.settings import ClusterSettings
from splitserve.v1 import worker_pb2, worker_pb2_grpc

log = get_logger("gateway")
ROLES = (PREFILL, DECODE)


@dataclass
class WorkerHandle:
    info: WorkerInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.PrefillWorkerStub | worker_pb2_grpc.DecodeWorkerStub
    failures: int = 0  # polls in a row that got no answer
    inflight: dict[int, Callable[[str], None]] = field(default_factory=dict)  # call -> on_down


class WorkerPool:
    """Prefill and decode workers from the config. Create it on the serving loop."""

    def __init__(self, settings: ClusterSettings, metadata: Sequence[tuple[str, str]] = (),
                 *, poll_s: float = 0.25, poll_timeout_s: float = 1.0,
                 failures_to_down: int = 2) -> None:
        self.model = settings.model.name
        self.metadata = tuple(metadata)
        self.handles: dict[str, WorkerHandle] = {}
        for role, endpoints, stub_cls in (
            (PREFILL, settings.prefill, worker_pb2_grpc.PrefillWorkerStub),
            (DECODE, settings.decode, worker_pb2_grpc.DecodeWorkerStub),
        ):
            for ep in endpoints:
                info = WorkerInfo(worker_id=f"{role}/{ep.address}", address=ep.address,
                                  role=role, model=self.model, healthy=False)
                channel = grpc.aio.insecure_channel(ep.address, options=GRPC_OPTIONS)
                self.handles[info.worker_id] = WorkerHandle(info, channel, stub_cls(channel))
        self.poll_s, self.poll_timeout_s = poll_s, poll_timeout_s
        self.failures_to_down = failures_to_down
        self.on_change: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> WorkerPool:
        await self.refresh()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-poll")
        return self

    # -- what the router and the flow use -----------------------------------------------

    def workers(self, role: str) -> list[WorkerInfo]:
        return [h.info for h in self.handles.values() if h.info.role == role]

    def stub(self, info: WorkerInfo) -> worker_pb2_grpc.PrefillWorkerStub:
        return self.handles[info.worker_id].stub

    def missing_roles(self) -> list[str]:
        """The roles with no healthy worker: while any, the gateway cannot serve."""
        # with no prefill worker at all the cluster is colocated: decode workers prefill
        needed = [r for r in ROLES if r == DECODE or self.workers(r)]
        return [r for r in needed if not any(w.healthy for w in self.workers(r))]

    def all_roles_healthy(self) -> bool:
        return not self.missing_roles()

    def track(self, info: WorkerInfo, on_down: Callable[[str], None]) -> Callable[[], None]:
        """A call is in flight on ``info``: ``on_down(why)`` if the worker goes down.
        Returns the function that stops tracking it."""
        inflight = self.handles[info.worker_id].inflight
        key = id(on_down)
        inflight[key] = on_down
        return lambda: inflight.pop(key, None)

    def mark_failed(self, info: WorkerInfo) -> None:
        """A call to it just failed to connect: skip it until a poll finds it alive."""
        self._set_down(self.handles[info.worker_id], "UNAVAILABLE", strand=False)

    # -- polling ------------------------------------------------------------------------

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(h) for h in self.handles.values()))

    async def _poll(self, handle: WorkerHandle) -> None:
        try:
            load = await handle.stub.GetLoad(worker_pb2.LoadRequest(), metadata=self.metadata,
                                             timeout=self.poll_timeout_s)
        except grpc.aio.AioRpcError as e:
            handle.failures += 1
            if (e.code() == grpc.StatusCode.UNAVAILABLE
                    or handle.failures >= self.failures_to_down):
                self._set_down(handle, e.code().name)
            return
        handle.failures = 0
        handle.info.update_load(load)
        if not handle.info.healthy:
            log.info("worker_up", worker=handle.info.worker_id)
            handle.info.healthy = True
            self.on_change()

    def _set_down(self, handle: WorkerHandle, why: str, strand: bool = True) -> None:
        info = handle.info
        if info.healthy:
            log.warning("worker_down", worker=info.worker_id, error=why)
            info.healthy = False
            self.on_change()
        if not strand:  # its other calls see the failure themselves
            return
        stranded, handle.inflight = handle.inflight, {}
        for on_down in stranded.values():
            on_down(f"{info.role} worker {info.address} stopped answering ({why})")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as e:  # the poll must outlive any surprise
                log.error("worker_poll_failed", error=repr(e))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for h in self.handles.values():
            await h.channel.close()
