"""Sessions: a conversation's KV kept in the store between its turns.

A request with a ``session_id`` says it will continue (a tool call, the next agent
step). When it finishes, the gateway pins the full blocks of its prompt and answer in
the store under the session's owner, for ``gateway.session_ttl_s`` after its last turn
(the store expires the owner), so the next turn — whose prompt starts with this one's
prompt and answer — finds them there and computes only its new tokens. A request with
``end_session`` releases them when it ends. The owner is named from the session id
inside the request's cache salt, which carries the client's tenant: one tenant can
never name, extend or end another tenant's session (and its KV is salted apart too).

One client keeps at most ``gateway.session_max_blocks`` blocks pinned in sessions
through a gateway (``SessionBook``): beyond, its least recently continued sessions
are let go (their next turn recomputes), so no tenant can fill the store with pins.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

OWNER_PREFIX = "session:"


def session_owner(cache_salt: str, session_id: str) -> str:
    """The store owner holding ``session_id``'s KV for clients of ``cache_salt``."""
    scoped = f"{len(cache_salt)}:{cache_salt}|{session_id}".encode()
    return OWNER_PREFIX + hashlib.blake2b(scoped, digest_size=16).hexdigest()


def tokens_with_kv(prompt: Sequence[int], outputs: Sequence[int]) -> list[int]:
    """The tokens whose KV a finished request computed: all but the last one sampled
    (its KV comes with the next step, which never ran)."""
    tokens = [*prompt, *outputs]
    return tokens[:-1] if outputs else tokens


class SessionBook:
    """The blocks each client keeps pinned in sessions, least recently continued first.
    Entries older than the TTL are gone from the store already and are dropped here."""

    def __init__(self, max_blocks: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_blocks, self.ttl_s, self._clock = max_blocks, ttl_s, clock
        self._clients: dict[str, OrderedDict[str, tuple[int, float]]] = {}

    def kept(self, client: str, owner: str, blocks: int) -> list[str]:
        """``client`` keeps ``blocks`` under session ``owner`` now -> the sessions of
        that client to let go (oldest first) to stay within ``max_blocks``."""
        now = self._clock()
        book = self._clients.setdefault(client, OrderedDict())
        for old in [o for o, (_, at) in book.items() if at + self.ttl_s < now]:
            del book[old]
        book[owner] = (blocks, now)
        book.move_to_end(owner)
        evicted = []
        total = sum(n for n, _ in book.values())
        while self.max_blocks and total > self.max_blocks and len(book) > 1:
            old, (n, _) = book.popitem(last=False)
            evicted.append(old)
            total -= n
        return evicted

    def ended(self, client: str, owner: str) -> None:
        book = self._clients.get(client)
        if book is not None:
            book.pop(owner, None)
            if not book:
                del self._clients[client]
