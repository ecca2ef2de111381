"""Names of the KV store's shared-memory arenas: ``splitserve-kv-<store pid>-<random>``.

The pid in the name lets whoever started a store remove its arena when the store
could not (killed outright, with its resource tracker, by a process-group SIGKILL).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PREFIX = "splitserve-kv-"
SHM_DIR = Path("/dev/shm")


def new_arena_name(pid: int | None = None) -> str:
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"


def remove_arenas_of(pid: int) -> list[str]:
    """Unlinks the arenas a (dead) store process left behind -> their names."""
    if not SHM_DIR.is_dir():
        return []
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}{pid}-*"):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed
