"""The header at the start of the store's shared-memory CPU arena.

It names the store, so that a client that opened a shared-memory segment by name
can check it is the arena Describe told it about. Its second half holds the landing
pads: 8 bytes each, where a device writer's stream writes a spilled put's landing token
after the put's copies (see kvstore.landing). The header is half a page, so
that blocks (sizes are multiples of pages) start mid-page: a copy between a block
and a buffer that starts 16 bytes into a page (what malloc gives for large buffers)
then avoids 4K aliasing, which costs x3-4 in memcpy speed on x86.
"""

from __future__ import annotations

HEADER_BYTES = 2048  # block payloads start after this
LANDING_BASE = 1024  # the landing pads: the header's second half
PAD_BYTES = 8  # a token: a little-endian int64 (what the device writes)
LANDING_PADS = (HEADER_BYTES - LANDING_BASE) // PAD_BYTES
MAGIC = b"SPLITSERVE-KV-ARENA\x00"


def arena_header(store_id: str) -> bytes:
    return MAGIC + store_id.encode() + b"\x00"
