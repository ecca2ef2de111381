"""Cluster state in Redis: members register, heartbeat their live load, publish KV events.

Keys (``ns`` is ``registry_namespace``):

* ``ns:member:<id>`` -- JSON of a :class:`Member` (identity, capacity, live load), set
  with a TTL of ``registry_ttl_s`` at every heartbeat: a member that stops beating is
  gone from the registry within the TTL; a clean stop deletes it at once.
* ``ns:kvset:<id>`` -- the set of block hashes (hex) in a worker's prefix cache, kept
  with the member's TTL, read whole by a gateway that (re)connects or missed events.
* channel ``ns:kv`` -- KV events: ``{"w": id, "seq": n, "s": [stored], "r": [removed],
  "reset": bool}``; ``seq`` counts a worker's messages, so a gap is seen and repaired
  by re-reading the set.

Member ids are ``<role>/<host:port>``, the same as the gateway's pool keys, so a
worker named in the config and found in the registry is one worker.

Redis going away never stops a member: it keeps serving, logs it once, retries with
backoff, and rewrites its key and KV set when Redis is back (a restarted Redis is
empty). No torch here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from prometheus_client import Counter, Gauge

from services.common.logging import get_logger

log = get_logger("registry")
MAX_BACKOFF_S = 2.0
KV_FLUSH_S = 0.05  # KV events are published at most this late
SET_CHUNK = 1000  # hashes per SADD when rewriting a whole set

REDIS_UP = Gauge("splitserve_registry_connected",
                 "1 while this process reaches the cluster registry (Redis)")
REDIS_ERRORS = Counter("splitserve_registry_errors", "Failed calls to the cluster registry")
REDIS_ERRORS_T = (redis.RedisError, OSError)


def advertised_host(host: str) -> str:
    """What peers dial: a wildcard bind address is replaced by this host's name."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host


def member_id(role: str, address: str) -> str:
    return f"{role}/{address}"


@dataclass
class Member:
    role: str  # prefill | decode | kvstore
    address: str  # host:port of its gRPC server
    model: str = ""
    http_port: int = 0
    kv_blocks: int = 0  # capacity
    max_seqs: int = 0
    load: dict[str, int] = field(default_factory=dict)  # running, waiting, queued_tokens, ...

    @property
    def id(self) -> str:
        return member_id(self.role, self.address)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Member:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Keys:
    ns: str = "splitserve"

    def member(self, mid: str) -> str:
        return f"{self.ns}:member:{mid}"

    @property
    def member_pattern(self) -> str:
        return f"{self.ns}:member:*"

    def kvset(self, mid: str) -> str:
        return f"{self.ns}:kvset:{mid}"

    @property
    def kv_channel(self) -> str:
        return f"{self.ns}:kv"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                health_check_interval=0)


class Backoff:
    """Delays between reconnect attempts: 0.1 s doubling up to ``MAX_BACKOFF_S``."""

    def __init__(self, first_s: float = 0.1) -> None:
        self.first_s = first_s
        self.next_s = first_s

    def fail(self) -> float:
        delay, self.next_s = self.next_s, min(self.next_s * 2, MAX_BACKOFF_S)
        return delay

    def reset(self) -> None:
        self.next_s = self.first_s


class LinkState:
    """Up or down, logged and exported on changes; ``on_change(up, reason)`` too."""

    def __init__(self, who: str, on_change: Callable[[bool, str], None] | None = None) -> None:
        self.who = who
        self.up: bool | None = None
        self.on_change = on_change or (lambda up, reason: None)

    def set(self, up: bool, error: str = "") -> None:
        if not up:
            REDIS_ERRORS.inc()
        if up == self.up:
            return
        self.up = up
        REDIS_UP.set(1 if up else 0)
        if up:
            log.info("registry_connected", who=self.who)
            self.on_change(True, "")
        else:
            log.warning("registry_unreachable", who=self.who, error=error)
            self.on_change(False, f"degraded: cluster registry (Redis) unreachable: {error}")


class KVEventBuffer:
    """Stored/removed block hashes from the engine's thread, drained by the registrar.
    ``add`` is the block manager's ``on_kv_event`` hook: one list append."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[bytes, bool]] = []

    def add(self, block_hash: bytes, stored: bool) -> None:
        with self._lock:
            self._events.append((block_hash, stored))

    def drain(self) -> list[tuple[bytes, bool]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class Registrar:
    """One member's registration: heartbeat with live load, KV events, deregistration.
    Runs in a daemon thread; ``load()`` is called at every heartbeat."""

    def __init__(self, url: str, member: Member, load: Callable[[], dict[str, int]], *,
                 ttl_s: float = 3.0, heartbeat_s: float = 0.5, namespace: str = "splitserve",
                 kv_events: KVEventBuffer | None = None,
                 on_change: Callable[[bool, str], None] | None = None) -> None:
        self.member, self.load = member, load
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.heartbeat_s = heartbeat_s
        self.keys = Keys(namespace)
        self.kv_events = kv_events
        self.held: set[bytes] = set()  # mirror of the prefix cache: rewritten on reconnect
        self.seq = 0
        self.state = LinkState(member.id, on_change)
        self._client = connect(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)

    def start(self) -> Registrar:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leaves the registry at once (gateways need not wait for the TTL)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            mid = self.member.id
            self._client.delete(self.keys.member(mid), self.keys.kvset(mid))
        except REDIS_ERRORS_T as e:
            log.warning("deregister_failed", who=self.member.id, error=str(e))
        self._client.close()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff()
        fresh = True  # (re)connected: Redis may have lost everything, write it all
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                if fresh:
                    self._rewrite()
                    fresh = False
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + self.heartbeat_s
                self._publish(self._drain())
                self.state.set(True)
                backoff.reset()
                self._stop.wait(KV_FLUSH_S if self.kv_events else self.heartbeat_s)
            except REDIS_ERRORS_T as e:
                self.state.set(False, str(e) or type(e).__name__)
                fresh = True
                self._drain()  # into the mirror (bounded by the cache), rewritten on reconnect
                self._stop.wait(backoff.fail())

    def _heartbeat(self) -> None:
        self.member.load = self.load()
        mid = self.member.id
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self.keys.member(mid), self.member.to_json(), px=self.ttl_ms)
        if self.kv_events is not None:
            pipe.pexpire(self.keys.kvset(mid), self.ttl_ms)
        pipe.execute()

    def _drain(self) -> tuple[list[bytes], list[bytes]]:
        """Folds pending events into the mirror; returns (stored, removed) since last."""
        if self.kv_events is None:
            return [], []
        stored: dict[bytes, None] = {}
        removed: dict[bytes, None] = {}
        for h, is_stored in self.kv_events.drain():
            (stored if is_stored else removed)[h] = None
            (removed if is_stored else stored).pop(h, None)
            if is_stored:
                self.held.add(h)
            else:
                self.held.discard(h)
        return list(stored), list(removed)

    def _publish(self, events: tuple[list[bytes], list[bytes]], reset: bool = False) -> None:
        stored, removed = events
        if not (stored or removed or reset):
            return
        mid = self.member.id
        self.seq += 1
        msg = {"w": mid, "seq": self.seq, "s": [h.hex() for h in stored],
               "r": [h.hex() for h in removed], "reset": reset}
        pipe = self._client.pipeline(transaction=False)
        if stored:
            pipe.sadd(self.keys.kvset(mid), *msg["s"])
        if removed:
            pipe.srem(self.keys.kvset(mid), *msg["r"])
        pipe.pexpire(self.keys.kvset(mid), self.ttl_ms)
        pipe.publish(self.keys.kv_channel, json.dumps(msg, separators=(",", ":")))
        pipe.execute()

    def _rewrite(self) -> None:
        """The whole state again: KV set from the mirror, member key, a reset event (a
        gateway that sees the member can read its whole set)."""
        if self.kv_events is None:
            self._heartbeat()
            return
        self._drain()
        key = self.keys.kvset(self.member.id)
        held = [h.hex() for h in self.held]
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(key)
        for i in range(0, len(held), SET_CHUNK):
            pipe.sadd(key, *held[i:i + SET_CHUNK])
        pipe.pexpire(key, self.ttl_ms)
        pipe.execute()
        self._heartbeat()
        self._publish(([], []), reset=True)


def start_registrar(settings: Any, member: Member, load: Callable[[], dict[str, int]],
                    kv_events: KVEventBuffer | None = None,
                    on_change: Callable[[bool, str], None] | None = None) -> Registrar | None:
    """A started registrar for ``member``, or None when the cluster has no ``redis_url``."""
    if not settings.redis_url:
        return None
    return Registrar(settings.redis_url, member, load, ttl_s=settings.registry_ttl_s,
                     heartbeat_s=settings.registry_heartbeat_s,
                     namespace=settings.registry_namespace, kv_events=kv_events,
                     on_change=on_change).start()


def read_members(client: redis.Redis, keys: Keys) -> dict[str, Member]:
    """Every registered member (id -> Member) whose heartbeat has not expired."""
    names = list(client.scan_iter(match=keys.member_pattern, count=500))
    members: dict[str, Member] = {}
    for raw in client.mget(names) if names else []:
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            m = Member.from_json(raw)
        except (ValueError, TypeError) as e:
            log.warning("bad_member_record", error=str(e))
            continue
        members[m.id] = m
    return members
