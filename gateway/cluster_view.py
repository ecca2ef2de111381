"""The gateway's reader of the Redis registry: members and KV events.

A daemon thread reads the registered members every ``poll_s`` and hands them to
``on_members`` (the worker pool, on the serving loop), and follows the KV event
channel into a :class:`~gateway.kv_index.KVIndex`. On a (re)connect, a member seen
for the first time, a ``reset`` event or a gap in a worker's event numbers, the
worker's whole KV set is read again. Redis going away keeps the last view: nothing
is dropped, the link is reported (``on_link``), and reading resumes with backoff.
Members missing right after a reconnect are kept for ``grace_s`` (one TTL): a
restarted Redis is empty until they have written themselves again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

import redis

from gateway.kv_index import KVIndex
from services.common.logging import get_logger
from services.common.registry import (
    REDIS_ERRORS_T,
    Backoff,
    Keys,
    LinkState,
    Member,
    connect,
    read_members,
)

log = get_logger("gateway")


class ClusterView:
    def __init__(self, url: str, namespace: str, index: KVIndex,
                 on_members: Callable[[dict[str, Member]], None],
                 on_link: Callable[[bool, str], None] | None = None,
                 poll_s: float = 0.25, grace_s: float = 3.0) -> None:
        self.keys = Keys(namespace)
        self.index = index
        self.on_members = on_members
        self.poll_s = poll_s
        self.grace_s = grace_s  # after a (re)connect: members may still be rewriting themselves
        self._grace_until = 0.0
        self.state = LinkState("gateway", on_link)
        self.members: dict[str, Member] = {}
        self._client = connect(url)
        self._seq: dict[str, int] = {}  # worker -> last KV event number applied
        self._loaded: set[str] = set()  # members whose KV set was read since the connect
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)

    def start(self) -> ClusterView:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def refresh(self) -> dict[str, Member]:
        """Reads the members now (also the first read at start); raises on Redis errors."""
        members = read_members(self._client, self.keys)
        if time.monotonic() < self._grace_until:  # a restarted Redis is empty at first
            members = {**self.members, **members}
        for mid in members.keys() - self._loaded:  # new, or not read since a reconnect
            self._reload(mid)
        for mid in self.members.keys() - members.keys():
            log.info("member_left", member=mid, members=sorted(members))
            self.index.forget(mid)
            self._seq.pop(mid, None)
            self._loaded.discard(mid)
        self.members = members
        self.on_members(members)
        return members

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.kv_channel)
                if self.state.up is False:
                    self._grace_until = time.monotonic() + self.grace_s
                self._loaded.clear()  # events were missed while away: read the sets again
                self._follow(pubsub, backoff)
            except REDIS_ERRORS_T as e:
                self.state.set(False, str(e) or type(e).__name__)
                self._stop.wait(backoff.fail())
            finally:
                with contextlib.suppress(REDIS_ERRORS_T):
                    pubsub.close()

    def _follow(self, pubsub: redis.client.PubSub, backoff: Backoff) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self.refresh()
                self.state.set(True)
                backoff.reset()
                next_poll = now + self.poll_s
            msg = pubsub.get_message(timeout=min(0.05, self.poll_s))
            while msg is not None:
                self._apply(msg)
                msg = pubsub.get_message(timeout=0)

    def _apply(self, msg: dict) -> None:
        try:
            ev = json.loads(msg["data"])
            worker, seq = ev["w"], int(ev["seq"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad_kv_event", error=str(e))
            return
        last = self._seq.get(worker)
        if ev.get("reset") or last is None or seq != last + 1:
            self._reload(worker)  # reads the set, which includes this event
            self._seq[worker] = seq
            return
        self._seq[worker] = seq
        self.index.apply(worker, (bytes.fromhex(h) for h in ev.get("s", ())),
                         (bytes.fromhex(h) for h in ev.get("r", ())))

    def _reload(self, worker: str) -> None:
        held = self._client.smembers(self.keys.kvset(worker))
        self.index.reset(worker, (bytes.fromhex(h.decode()) for h in held))
        self._loaded.add(worker)
