"""Who is calling: the namespace of a client's request ids and its cache salt.

With ``gateway.api_keys`` configured, a call must carry one of the keys
(``x-api-key: KEY`` or ``authorization: Bearer KEY``); the key is the client's
identity: its request ids, its aborts and its default cache salt. With no keys
configured the gateway is open, and a client is its connection (the peer
address), so ``Abort`` works from the channel that sent the request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from gateway.validation import RequestError

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
BEARER = "bearer "


@dataclass(frozen=True)
class Client:
    owner: str  # the namespace of this client's request ids
    tenant_salt: str = ""  # mixed into every cache salt of the client ('' -> none)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def presented_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if key == API_KEY_HEADER:
            return text
        if key == AUTHORIZATION_HEADER and text.lower().startswith(BEARER):
            return text[len(BEARER):].strip()
    return None


class ClientIdentifier:
    def __init__(self, api_keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in api_keys if k]

    @property
    def keyed(self) -> bool:
        return bool(self._keys)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                 peer: str) -> Client:
        """The calling client; raises UNAUTHENTICATED when keys are required and the
        call has none of them."""
        if not self._keys:
            return Client(owner=f"peer:{peer}")
        key = presented_key(metadata)
        if key is None or not any(hmac.compare_digest(key.encode(), k) for k in self._keys):
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this gateway needs an API key: send metadata 'x-api-key: KEY' or "
                "'authorization: Bearer KEY' with a key from gateway.api_keys",
            )
        tenant = f"key:{_digest(key)}"
        return Client(owner=tenant, tenant_salt=tenant)


def effective_cache_salt(client: Client, requested: str) -> str:
    """The salt the workers hash with: the request's own, inside the tenant's, so that
    one tenant can never name another tenant's salt."""
    if not client.tenant_salt:
        return requested
    return f"{client.tenant_salt}/{requested}" if requested else client.tenant_salt
