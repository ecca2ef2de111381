"""The gateway's view of its workers: stubs, health and load, polled on the event loop.

Every ``poll_s`` each worker is asked ``GetLoad`` with a ``poll_timeout_s`` deadline.
A worker that refuses connections is down at once; one that stops answering (hung,
SIGSTOPped) is down after ``failures_to_down`` polls in a row time out, and then
every call in flight on it is interrupted (its flow then moves the request to another
worker, or fails it with UNAVAILABLE) instead of hanging.
``on_change`` is called whenever the set of healthy workers changes (readiness).

With the Redis registry, :meth:`WorkerPool.sync` adds the registered workers (a
worker started later is polled, then routed to) and removes the ones whose
registration expired (``on_removed`` then drops their routing state); the config's
workers stay as seeds, so a gateway that cannot reach Redis still serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.router import DECODE, PREFILL, WorkerInfo
from services.common.logging import get_logger
from services.common.registry import Member, member_id
from services.common.server import GRPC_OPTIONS
from services.common.settings import ClusterSettings
from splitserve.v1 import worker_pb2, worker_pb2_grpc

log = get_logger("gateway")
ROLES = (PREFILL, DECODE)
STUBS = {PREFILL: worker_pb2_grpc.PrefillWorkerStub, DECODE: worker_pb2_grpc.DecodeWorkerStub}


@dataclass
class WorkerHandle:
    info: WorkerInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.PrefillWorkerStub | worker_pb2_grpc.DecodeWorkerStub
    failures: int = 0  # polls in a row that got no answer
    registered: bool = False  # found in the registry
    seed: bool = False  # named in the config: kept when it leaves the registry
    inflight: dict[int, Callable[[str], None]] = field(default_factory=dict)  # call -> on_down


class WorkerPool:
    """Prefill and decode workers from the config, each of its model. Create it on the
    serving loop."""

    def __init__(self, settings: ClusterSettings, metadata: Sequence[tuple[str, str]] = (),
                 *, poll_s: float = 0.25, poll_timeout_s: float = 1.0,
                 failures_to_down: int = 2) -> None:
        self.models = [m.name for m in settings.served_models()]
        self.metadata = tuple(metadata)
        self.handles: dict[str, WorkerHandle] = {}
        for role, endpoints in ((PREFILL, settings.prefill), (DECODE, settings.decode)):
            for ep in endpoints:
                self._add(role, ep.address, settings.model_of(ep).name).seed = True
        self.poll_s, self.poll_timeout_s = poll_s, poll_timeout_s
        self.failures_to_down = failures_to_down
        self.on_change: Callable[[], None] = lambda: None
        self.on_removed: Callable[[str], None] = lambda worker_id: None
        self._task: asyncio.Task[None] | None = None

    def _add(self, role: str, address: str, model: str) -> WorkerHandle:
        stub_cls = STUBS[role]
        info = WorkerInfo(worker_id=member_id(role, address), address=address, role=role,
                          model=model, healthy=False)
        channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        handle = self.handles[info.worker_id] = WorkerHandle(info, channel, stub_cls(channel))
        return handle

    def sync(self, members: Mapping[str, Member]) -> None:
        """Takes in the registry's members: new workers are added (and polled at once),
        registered ones that left are removed. Call on the serving loop."""
        for mid, m in members.items():
            if m.role not in ROLES:
                continue
            handle = self.handles.get(mid)
            if handle is None:
                handle = self._add(m.role, m.address, m.model)
                log.info("worker_registered", worker=mid, model=m.model)
                if m.model and m.model not in self.models:  # said once: it is added once
                    log.warning("worker_serves_unknown_model", worker=mid, model=m.model,
                                served=self.models, detail="no request is routed to it; "
                                "add its model to this gateway's config (models:)")
                asyncio.get_running_loop().create_task(self._poll(handle))
            handle.registered = True
        for wid, handle in list(self.handles.items()):
            if handle.registered and not handle.seed and wid not in members:
                self._remove(handle)

    def _remove(self, handle: WorkerHandle) -> None:
        wid = handle.info.worker_id
        log.warning("worker_deregistered", worker=wid)
        self._set_down(handle, "left the registry")
        del self.handles[wid]
        self.on_removed(wid)
        asyncio.get_running_loop().create_task(handle.channel.close(grace=1.0))

    async def start(self) -> WorkerPool:
        await self.refresh()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-poll")
        return self

    # -- what the router and the flow use -----------------------------------------------

    def workers(self, role: str, model: str = "") -> list[WorkerInfo]:
        """The workers of ``role`` that serve ``model`` ("" -> of every model)."""
        return [h.info for h in self.handles.values()
                if h.info.role == role and h.info.serves(model)]

    def stub(self, info: WorkerInfo) -> worker_pb2_grpc.PrefillWorkerStub:
        return self.handles[info.worker_id].stub

    def missing_roles(self, model: str = "") -> list[str]:
        """The roles with no healthy worker of ``model``: while any, it cannot be served."""
        # with no prefill worker at all the model is colocated: decode workers prefill
        needed = [r for r in ROLES if r == DECODE or self.workers(r, model)]
        return [r for r in needed if not any(w.healthy for w in self.workers(r, model))]

    def missing_workers(self) -> list[str]:
        """What the gateway lacks to serve every model, said for a person ("decode",
        "prefill for model 'b'"); empty when it can serve them all."""
        several = len(self.models) > 1
        return [role + (f" for model {model!r}" if several else "")
                for model in self.models for role in self.missing_roles(model)]

    def all_roles_healthy(self) -> bool:
        return not self.missing_workers()

    def track(self, info: WorkerInfo, on_down: Callable[[str], None]) -> Callable[[], None]:
        """A call is in flight on ``info``: ``on_down(why)`` if the worker goes down.
        Returns the function that stops tracking it."""
        handle = self.handles.get(info.worker_id)
        if handle is None:  # it left the cluster since it was picked
            on_down(f"{info.role} worker {info.address} left the cluster")
            return lambda: None
        inflight = handle.inflight
        key = id(on_down)
        inflight[key] = on_down
        return lambda: inflight.pop(key, None)

    def mark_failed(self, info: WorkerInfo) -> None:
        """A call to it just failed to connect: skip it until a poll finds it alive."""
        handle = self.handles.get(info.worker_id)
        if handle is not None:
            self._set_down(handle, "UNAVAILABLE", strand=False)

    # -- polling ------------------------------------------------------------------------

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(h) for h in list(self.handles.values())))

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
        if not handle.info.healthy and handle.info.worker_id in self.handles:
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
