"""The one block-hash function of SplitServe.

A full block of ``block_size`` tokens is named by a chained digest:
``h_i = H(h_{i-1}, tokens of block i, model id, block size, dtype)``.
The engine's prefix cache, the KV store's keys and the gateway's router all
call this module, so a hash names the same KV bytes everywhere. Partial (last)
blocks have no hash and are never shared. Pure Python: no torch here.

A tenant's ``cache_salt`` replaces the all-zero root of the chain, so the same
tokens under different salts share no block anywhere (engine cache, store,
router); the empty salt gives the unsalted hashes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

DIGEST_BYTES = 16  # 128-bit names
ROOT_PARENT = b"\x00" * DIGEST_BYTES
PERSON = b"splitserve-kv1"
# Digests already computed in this process, by their exact input (parent, context, block
# bytes): 32 agents that share an 8K system prompt reach a worker together, and each
# would hash the same 512 blocks again, on threads that share the interpreter with the
# engine's launches. A hit costs a dict lookup instead of a blake2b call (~2.5x faster
# over a whole prompt). Bounded: emptied when full (~16 MiB at most).
MEMO_ENTRIES = 1 << 16
_memo: dict[bytes, bytes] = {}


@dataclass(frozen=True)
class HashContext:
    """What, besides the tokens, decides the bytes of a KV block."""

    model_id: str
    block_size: int
    dtype: str

    def salt(self) -> bytes:
        return f"{self.model_id}|{self.block_size}|{self.dtype}".encode()


def chain_root(cache_salt: str = "") -> bytes:
    """The parent of a chain's first block: all zeros, or a digest of the salt."""
    if not cache_salt:
        return ROOT_PARENT
    return hashlib.blake2b(cache_salt.encode(), digest_size=DIGEST_BYTES,
                           person=b"splitserve-salt").digest()


def hash_block(parent: bytes | None, tokens: Sequence[int], ctx: HashContext,
               cache_salt: str = "") -> bytes:
    """Digest of one full block, chained on its parent's digest (None for the first,
    whose parent is the root of ``cache_salt``)."""
    if len(tokens) != ctx.block_size:
        raise ValueError(f"a hashed block holds exactly {ctx.block_size} tokens, got {len(tokens)}")
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=PERSON)
    h.update(parent if parent is not None else chain_root(cache_salt))
    h.update(ctx.salt())
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(
    tokens: Sequence[int], ctx: HashContext, parent: bytes | None = None, cache_salt: str = ""
) -> list[bytes]:
    """Chained digests of every full block of ``tokens`` (the partial tail gets none)."""
    bs = ctx.block_size
    n = len(tokens) // bs
    if parent is None:
        parent = chain_root(cache_salt)
    # hash_block's digests, with the tokens packed once and the salt encoded once:
    # a long prompt's hashes are computed on every worker it reaches
    packed = struct.pack(f"<{n * bs}q", *tokens[: n * bs])
    salt, step = ctx.salt(), bs * 8
    if len(_memo) + n > MEMO_ENTRIES:
        _memo.clear()
    out: list[bytes] = []
    for i in range(0, n * step, step):
        key = parent + salt + packed[i : i + step]  # what blake2b reads, in its order
        digest = _memo.get(key)
        if digest is None:
            digest = _memo[key] = hashlib.blake2b(key, digest_size=DIGEST_BYTES,
                                                  person=PERSON).digest()
        parent = digest
        out.append(digest)
    return out
