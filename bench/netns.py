"""Two hosts on one machine: a network namespace joined to this one by a veth pair.

The KV store runs inside the namespace (``ip netns exec NS splitserve serve kvstore``);
this process, in the root namespace, is the other host. Used by the cross-host tests
(tests/integration/test_netns.py) and ``splitserve bench transfer --netns``. Needs root
and iproute2; ``unavailable()`` says why not. Everything made is removed on exit, also
when the body raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import ClusterSettings


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


@dataclass
class NetnsPair:
    ns: str  # the namespace (the store's host)
    inner: str  # its end of the veth pair
    outer: str  # this namespace's end
    inner_ip: str
    outer_ip: str

    def link(self, up: bool) -> None:
        """Takes the link between the two hosts down or up (this side's end)."""
        ip("link", "set", self.outer, "up" if up else "down")

    def shape(self, rate: str | None) -> None:
        """Limits what this side sends to ``rate`` (tc tbf, e.g. "100mbit"); None: off."""
        subprocess.run(["tc", "qdisc", "del", "dev", self.outer, "root"], capture_output=True)
        if rate:
            subprocess.run(["tc", "qdisc", "add", "dev", self.outer, "root", "tbf", "rate", rate,
                            "burst", "64kb", "latency", "400ms"], check=True,
                           capture_output=True)


@contextlib.contextmanager
def netns_pair(tag: str | None = None) -> Iterator[NetnsPair]:
    tag = tag or os.urandom(3).hex()
    subnet = f"10.231.{int(tag[:2], 16)}"
    pair = NetnsPair(f"ss-{tag}", f"vi{tag}", f"vo{tag}", f"{subnet}.1", f"{subnet}.2")
    try:
        ip("netns", "add", pair.ns)
        ip("link", "add", pair.outer, "type", "veth", "peer", "name", pair.inner)
        ip("link", "set", pair.inner, "netns", pair.ns)
        ip("-n", pair.ns, "addr", "add", f"{pair.inner_ip}/24", "dev", pair.inner)
        ip("-n", pair.ns, "link", "set", pair.inner, "up")
        ip("-n", pair.ns, "link", "set", "lo", "up")
        ip("addr", "add", f"{pair.outer_ip}/24", "dev", pair.outer)
        ip("link", "set", pair.outer, "up")
        yield pair
    finally:
        ip("link", "del", pair.outer, check=False)  # takes its peer along
        ip("netns", "del", pair.ns, check=False)


class StoreInNetns:
    """``splitserve serve kvstore`` inside ``pair.ns``, listening on the namespace's
    address (settings.kvstore.host is set to it). ``env``: extra environment (UCX_TLS)."""

    def __init__(self, pair: NetnsPair, settings: ClusterSettings, workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.pair, self.settings, self.workdir = pair, settings, workdir
        settings.kvstore.host = pair.inner_ip
        self.config = workdir / "store.yaml"
        settings.dump_yaml(self.config)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.pair.inner_ip}:{self.settings.kvstore.port}"

    def start(self, timeout_s: float = 60.0) -> StoreInNetns:
        from services.transfer.store_client import KVStoreClient

        self.starts += 1
        log = open(self.workdir / f"store-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pair.ns, sys.executable, "-m", "services.cli",
             "serve", "kvstore", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the store in {self.pair.ns} exited "
                                   f"{self.proc.returncode}; see {log.name}")
            with contextlib.suppress(Exception), \
                    KVStoreClient(self.address, timeout_s=2.0) as c:
                c.describe()
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the store in {self.pair.ns} did not answer in "
                                   f"{timeout_s:g}s; see {log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> StoreInNetns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
