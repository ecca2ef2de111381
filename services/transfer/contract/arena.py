"""The header at the start of the store's shared-memory CPU arena.

It names the store, so that a client that opened a shared-memory segment by name
can check it is the arena Describe told it about. The header is half a page, so
that blocks (sizes are multiples of pages) start mid-page: a copy between a block
and a buffer that starts 16 bytes into a page (what malloc gives for large buffers)
then avoids 4K aliasing, which costs x3-4 in memcpy speed on x86.
"""

from __future__ import annotations

HEADER_BYTES = 2048  # block payloads start after this
MAGIC = b"SPLITSERVE-KV-ARENA\x00"


def arena_header(store_id: str) -> bytes:
    return MAGIC + store_id.encode() + b"\x00"
