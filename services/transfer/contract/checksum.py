"""crc32 (the zlib polynomial) of block payloads, with the fastest implementation at hand.

``isal`` or ``zlib-ng``, when installed, compute the same CRC-32 about 4x faster than
the stdlib's zlib (hardware carry-less multiply); every caller goes through ``crc32``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

crc32: Callable[..., int]
IMPLEMENTATION: str

try:  # pragma: no cover - depends on what is installed
    from isal.isal_zlib import crc32 as _isal_crc32

    crc32, IMPLEMENTATION = _isal_crc32, "isal"
except ImportError:  # pragma: no cover
    try:
        from zlib_ng.zlib_ng import crc32 as _ng_crc32

        crc32, IMPLEMENTATION = _ng_crc32, "zlib-ng"
    except ImportError:
        crc32, IMPLEMENTATION = zlib.crc32, "zlib"

if crc32(b"splitserve") != zlib.crc32(b"splitserve"):  # pragma: no cover
    crc32, IMPLEMENTATION = zlib.crc32, "zlib"
