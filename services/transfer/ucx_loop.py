"""What the ``ucx`` transport and the store's UCX listener share: whether ``ucxx`` (the
optional extra ``splitserve[ucx]``) is here, one asyncio loop per process that runs
every UCX call, and the framing of the small control messages on an endpoint.

ucxx is asyncio-only and keeps one application context per process, so a process
runs all its UCX work (a client's endpoints, a store's listener) on one loop, in one
daemon thread; synchronous callers hand it coroutines with ``run``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from google.protobuf.message import Message

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_ucxx: Any = None
_reason: str | None = None
_checked = False
_check_lock = threading.Lock()


def ucxx_module() -> Any:
    """The ``ucxx`` module, or None when it cannot be imported (see ``unavailable``)."""
    global _ucxx, _reason, _checked
    with _check_lock:
        if not _checked:
            _checked = True
            # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 warns about on every start
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
            # the worker waits on its event fd in the loop: no progress thread contending
            # for the GIL (2x faster than "thread" on a 2-core VM), no core burnt polling
            os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
            try:
                import ucxx
                _ucxx = ucxx
            except Exception as e:  # ImportError, or a broken native library
                _reason = (f"ucxx is not installed or does not load ({type(e).__name__}: "
                           f"{e}); install the extra: pip install 'splitserve[ucx]'")
        return _ucxx


def unavailable() -> str | None:
    """Why UCX cannot be used in this process, or None when it can."""
    ucxx_module()
    return _reason


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` blocks the caller on a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ucx-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """The coroutine's result; TimeoutError (the coroutine cancelled) past
        ``timeout_s``."""
        return asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coro, timeout_s), self.loop).result()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread


_loop: LoopThread | None = None
_loop_lock = threading.Lock()


def loop_thread() -> LoopThread:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = LoopThread()
        return _loop


async def send_msg(ep: Any, msg: Message) -> None:
    await ep.send_obj(msg.SerializeToString())


async def recv_msg(ep: Any, cls: type[M]) -> M:
    return cls.FromString(bytes(await ep.recv_obj()))



def context_started() -> bool:
    """Whether this process has started UCX (its interfaces are fixed from then on: UCX
    lists them once, so a link that comes up later is "unreachable" to this process)."""
    return _ucxx is not None and getattr(_ucxx.core, "_ctx", None) is not None
