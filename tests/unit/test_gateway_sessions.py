"""Session owners in the store: scoped by cache salt (so by tenant), one per session."""

from __future__ import annotations

from gateway.identity import Client, effective_cache_salt
from gateway.sessions import OWNER_PREFIX, session_owner, tokens_with_kv


def test_a_session_owner_is_scoped_to_its_tenant_and_salt() -> None:
    a, b = Client("key:a", tenant_salt="key:a"), Client("key:b", tenant_salt="key:b")
    owner = session_owner(effective_cache_salt(a, ""), "chat-1")
    assert owner.startswith(OWNER_PREFIX)
    assert owner == session_owner(effective_cache_salt(a, ""), "chat-1")  # every turn
    assert owner != session_owner(effective_cache_salt(b, ""), "chat-1")
    assert owner != session_owner(effective_cache_salt(a, "x"), "chat-1")
    assert owner != session_owner(effective_cache_salt(a, ""), "chat-2")
    # the salt and the id cannot be shifted into one another
    assert session_owner("a|b", "c") != session_owner("a", "b|c")


def test_the_kv_of_a_turn_ends_before_its_last_token() -> None:
    assert tokens_with_kv([1, 2, 3], [4, 5]) == [1, 2, 3, 4]
    assert tokens_with_kv([1, 2, 3], []) == [1, 2, 3]
