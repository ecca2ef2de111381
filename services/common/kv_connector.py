"""The KV connector: the one way KV enters and leaves a worker's engine.

Like vLLM's v1 connector it has two sides:

* the scheduler side answers "how many of this request's leading tokens can be
  had, and from where": the engine's own prefix cache first (a peek at its block
  hashes), then the store, only for the blocks the engine lacks;
* the worker side loads those blocks from the store (pinned for the request,
  straight into one host buffer the engine moves to the device in one copy; with
  the ``cuda_ipc`` transport, device to device with no host staging) and
  saves blocks out to the store as the engine reports them full (prefill blocks,
  decode blocks as they fill, a private partial tail).

Prefill, decode — and later preemption and migration — go through it; nothing
else moves KV between a worker and the store. No torch here except the staging
buffer, imported where an engine runs.

The store being unreachable (killed, restarting) costs reuse, never a request:
``load_prefix`` then finds only the engine's own prefix, and ``save`` says the
blocks did not get there, so the caller hands nothing over and the next worker
computes what is missing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.computing_prefixes import ComputingPrefixes
from services.common.logging import get_logger
from services.common.shared_fetch import SharedFetches
from services.transfer.store_client import KVStoreClient
from splitserve.v1 import common_pb2

log = get_logger("kv-connector")
HELD_WAIT_S = 2.0  # how long a save waits for a held block another request is putting
HELD_POLL_S = 0.005


def store_unreachable(e: BaseException) -> bool:
    """A store call that failed because the store could not be reached (UNAVAILABLE:
    down, restarting, a link gone), as opposed to an answer about the request."""
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE


def tail_key(request_id: str) -> bytes:
    """The private store key of a request's partial last block."""
    return hashlib.blake2b(b"tail|" + request_id.encode(), digest_size=16).digest()


def tail_ref(request_id: str, num_tokens: int) -> common_pb2.BlockRef:
    return common_pb2.BlockRef(key=tail_key(request_id), num_tokens=num_tokens, partial=True)


@dataclass
class KVLoad:
    """What a request gets before it runs: ``engine_blocks`` leading blocks from the
    engine's prefix cache, then ``payloads`` from the store (blocks
    ``engine_blocks ..``), together covering ``num_tokens`` tokens. ``held_blocks``:
    the leading blocks the store holds pinned for the request (None: those of
    ``payloads`` and the engine's before them), which it need not save again."""

    engine_blocks: int = 0
    payloads: list[Any] = field(default_factory=list)
    num_tokens: int = 0
    held_blocks: int | None = None

    @property
    def store_blocks(self) -> int:
        return len(self.payloads)

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``add_request`` arguments that hand this KV to the engine."""
        held = {} if self.held_blocks is None else {"kv_held_blocks": self.held_blocks}
        if not self.payloads:
            return held
        return {"kv_blocks": self.payloads, "kv_num_tokens": self.num_tokens,
                "kv_first_block": self.engine_blocks, **held}


class KVConnector:
    def __init__(self, store: KVStoreClient, cached_prefix_blocks: Callable[[list[bytes]], int],
                 block_size: int, block_nbytes: int, pinned_staging: bool, *,
                 prefix_reuse: bool = True,
                 forget_store: Callable[[], None] | None = None) -> None:
        self.store = store
        self._cached_prefix_blocks = cached_prefix_blocks
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self._pinned = pinned_staging
        self.prefix_reuse = prefix_reuse  # load_prefix asks the store (else: the engine only)
        self._shared = SharedFetches()  # a prefix several requests fetch at once: once
        self.computing = ComputingPrefixes()  # blocks the engine computes for a request now
        self._forget_store = forget_store  # the engine's: held blocks are gone from the store

    @property
    def device_payloads(self) -> bool:
        """Blocks move as device tensors (the store's gpu tier over cuda_ipc): the
        engine exports to device memory and imports device rows, no host staging."""
        return bool(getattr(self.store.transport, "device_payloads", False))

    # ---- scheduler side ----
    def engine_prefix(self, hashes: list[bytes]) -> int:
        """Leading blocks of ``hashes`` the engine's prefix cache holds now."""
        return self._cached_prefix_blocks(hashes)

    # ---- worker side: in ----
    def load_prefix(self, owner: str, hashes: list[bytes]) -> KVLoad:
        """A new prompt's full blocks ``hashes`` (the ones worth having: the last prompt
        token is always computed): the engine's held prefix, then the longest prefix of
        the rest the store holds. With store blocks, the engine does not export its
        blocks before them: the store's copies are pinned for ``owner`` now (those it
        lacks are exported after all)."""
        engine = self.engine_prefix(hashes)
        engine_only = KVLoad(engine, [], engine * self.block_size)
        if not self.prefix_reuse or engine == len(hashes):
            return engine_only
        if self.computing.computing(hashes[engine]):  # the engine has it before the store
            return engine_only
        try:
            payloads = self._fetch(owner, hashes[engine:], prefix=True)
            self.computing.add(hashes[engine + len(payloads):])
            if not payloads:  # the engine names its held blocks as it exports
                return engine_only
            pinned = self.store.pin(owner, hashes[:engine]) if engine else 0
        except grpc.RpcError as e:
            if not store_unreachable(e):
                raise
            log.warning("store_unreachable", request_id=owner, error=e.details(),
                        fallback="computing the prefix")
            return engine_only
        held = engine + len(payloads) if pinned == engine else pinned
        return KVLoad(engine, payloads, (engine + len(payloads)) * self.block_size, held)

    def load_exact(self, owner: str, keys: Sequence[bytes], full_blocks: int,
                   num_tokens: int) -> KVLoad:
        """Every block of ``keys`` (the first ``full_blocks`` named by their hash, then
        private ones) covering ``num_tokens`` tokens; the engine's held leading full
        blocks are not fetched. A block the store lacks fails the request (NOT_FOUND)."""
        engine = self.engine_prefix(list(keys[:full_blocks]))
        payloads = self._shared.fetch(
            list(keys[engine:]), full_blocks - engine,
            lambda ks: self._fetch(owner, ks, prefix=False),
            lambda ks: self.store.pin(owner, ks))
        return KVLoad(engine, payloads, num_tokens)

    def _fetch(self, owner: str, keys: Sequence[bytes], prefix: bool) -> list[Any]:
        if not keys:
            return []
        get = self.store.get_prefix if prefix else self.store.get
        if self.device_payloads:  # device rows (host buffers if the transport fell back)
            return list(get(owner, list(keys)))
        from services.engine.kv_cache import host_buffer  # torch: only where an engine runs

        staged = host_buffer(len(keys), self.block_nbytes, self._pinned)
        views = list(staged.numpy())  # transports view numpy rows far faster than tensors
        held = len(get(owner, list(keys), out=views))
        return list(staged[:held].unbind(0))

    # ---- worker side: out ----
    def save(self, owner: str, out: Any, with_tail: bool) -> bool:
        """Puts the blocks a step reported (``StepOutput.exported_blocks``, and the
        partial tail under the owner's private key when ``with_tail``) into the store,
        and pins the ones it named as held there (``held_blocks``), all for ``owner``.
        False (logged) when the store cannot be reached or lost a held block."""
        try:
            return self._pin_and_put(owner, out, with_tail)
        except grpc.RpcError as e:
            if not store_unreachable(e):
                raise
            log.warning("store_unreachable", request_id=owner, error=e.details(),
                        fallback="blocks not saved")
            return False

    def _pin_and_put(self, owner: str, out: Any, with_tail: bool) -> bool:
        if out.held_blocks and not self._pin_held(owner, list(out.held_blocks)):
            log.warning("held_blocks_gone", request_id=owner, blocks=len(out.held_blocks),
                        fallback="blocks not handed over; the engine exports its blocks "
                        "again from now on")
            if self._forget_store is not None:
                self._forget_store()
            return False
        blocks = list(out.exported_blocks)
        refs = [common_pb2.BlockRef(key=b.block_hash, num_tokens=b.num_tokens) for b in blocks]
        if with_tail and out.tail_block is not None:
            blocks.append(out.tail_block)
            refs.append(tail_ref(owner, out.tail_block.num_tokens))
        if blocks:
            self.store.put(owner, refs, [b.payload for b in blocks], self.block_nbytes)
        return True

    def _pin_held(self, owner: str, keys: list[bytes]) -> bool:
        """Pins ``keys`` for ``owner`` -> all of them. A held block may still be on its
        way: the request that exported it (agents that arrived together share one
        prompt) may not have put it yet, so the store is asked again until it has them
        or ``HELD_WAIT_S`` has passed (then a block was lost: evicted, or never put)."""
        end = time.monotonic() + HELD_WAIT_S
        pinned = 0
        while True:
            pinned += self.store.pin(owner, keys[pinned:])
            if pinned == len(keys) or time.monotonic() >= end:
                return pinned == len(keys)
            time.sleep(HELD_POLL_S)

    def release(self, owner: str) -> None:
        """Drops ``owner``'s pins (and its private tail); quiet if the store is away."""
        self.store.release_quietly(owner)
