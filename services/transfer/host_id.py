"""This host as the data plane sees it: the kernel's boot id and the network namespace.

Two processes in different network namespaces are two hosts to the transport ladder
(the store's shared memory is not offered across them, even where /dev/shm is shared),
and two containers with the same hostname on different machines differ by boot id.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path


@functools.cache
def host_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = "-"
    return f"{boot}/{netns}"
