"""Sessions: a conversation's KV kept in the store between its turns.

A request with a ``session_id`` says it will continue (a tool call, the next agent
step). When it finishes, the gateway pins the full blocks of its prompt and answer in
the store under the session's owner, for ``gateway.session_ttl_s`` after its last turn
(the store expires the owner), so the next turn — whose prompt starts with this one's
prompt and answer — finds them there and computes only its new tokens. A request with
``end_session`` releases them when it ends. The owner is named from the session id
inside the request's cache salt, which carries the client's tenant: one tenant can
never name, extend or end another tenant's session (and its KV is salted apart too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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
