"""The gateway's view of its workers: stubs, health and load, refreshed in the background."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from gateway.router import DECODE, PREFILL, WorkerInfo
from services.common.logging import get_logger
from services.common.settings import ClusterSettings
from splitserve.v1 import worker_pb2, worker_pb2_grpc

log = get_logger("gateway")


@dataclass
class WorkerHandle:
    info: WorkerInfo
    channel: grpc.Channel
    stub: worker_pb2_grpc.PrefillWorkerStub | worker_pb2_grpc.DecodeWorkerStub


class WorkerPool:
    """Prefill and decode workers from the config; GetLoad polled every ``poll_s``."""

    def __init__(self, settings: ClusterSettings, poll_s: float = 0.25) -> None:
        self.model = settings.model.name
        self.handles: dict[str, WorkerHandle] = {}
        for role, endpoints, stub_cls in (
            (PREFILL, settings.prefill, worker_pb2_grpc.PrefillWorkerStub),
            (DECODE, settings.decode, worker_pb2_grpc.DecodeWorkerStub),
        ):
            for ep in endpoints:
                info = WorkerInfo(worker_id=f"{role}/{ep.address}", address=ep.address,
                                  role=role, model=self.model, healthy=False)
                channel = grpc.insecure_channel(ep.address)
                self.handles[info.worker_id] = WorkerHandle(info, channel, stub_cls(channel))
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, name="worker-poll",
                                        daemon=True)

    def start(self) -> WorkerPool:
        self.refresh()
        self._thread.start()
        return self

    def workers(self, role: str) -> list[WorkerInfo]:
        return [h.info for h in self.handles.values() if h.info.role == role]

    def stub(self, info: WorkerInfo) -> worker_pb2_grpc.PrefillWorkerStub:
        return self.handles[info.worker_id].stub

    def all_roles_healthy(self) -> bool:
        return all(any(w.healthy for w in self.workers(r)) for r in (PREFILL, DECODE))

    def mark_failed(self, info: WorkerInfo) -> None:
        """A call to it just failed: skip it until a poll finds it alive again."""
        info.healthy = False

    def refresh(self) -> None:
        futures = [(h, h.stub.GetLoad.future(worker_pb2.LoadRequest(), timeout=1.0))
                   for h in self.handles.values()]
        for handle, future in futures:
            info = handle.info
            try:
                info.update_load(future.result())
                if not info.healthy:
                    log.info("worker_up", worker=info.worker_id)
                info.healthy = True
            except grpc.RpcError as e:
                if info.healthy:
                    log.warning("worker_down", worker=info.worker_id, error=e.code().name)
                info.healthy = False

    def _poll_forever(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        for h in self.handles.values():
            h.channel.close()
