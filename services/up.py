"""`splitserve up`: the whole cluster as local processes, until Ctrl-C (or SIGTERM/SIGHUP).

The services live exactly as long as `up`: they get SIGTERM when it exits, and
through the parent-death signal also when it is killed outright. A cluster without
a configured secret gets a random one, handed to its services in the environment,
so that no other local process can talk to its store or workers.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from services.common.auth import SECRET_ENV, cluster_secret
from services.common.launcher import LocalCluster
from services.common.settings import ClusterSettings, load_settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _write_config(settings: ClusterSettings, log_dir: Path) -> Path:
    path = log_dir / "cluster.yaml"
    settings.dump_yaml(path)
    path.chmod(0o600)  # it may hold the cluster secret
    return path


def _ensure_secret(settings: ClusterSettings) -> None:
    """A random cluster secret (in the environment the services inherit) unless one is
    configured."""
    if cluster_secret(settings) is None:
        os.environ[SECRET_ENV] = secrets.token_urlsafe(32)


def _print_endpoints(cluster: LocalCluster) -> None:
    print("SplitServe is up:")
    several = len(cluster.settings.served_models()) > 1
    for svc in cluster.services:
        ep = svc.endpoint
        http = f"  http://{ep.host}:{ep.http_port}/metrics" if ep.http_port else ""
        worker = svc.role in ("prefill", "decode")
        model = f"  model {cluster.settings.model_of(ep).name}" if several and worker else ""
        print(f"  {svc.name:<10} grpc {ep.address}{http}{model}")
    if cluster.redis is not None:
        print(f"  {'redis':<10} {cluster.redis.url}  (started by up: the cluster registry)")
    gw = cluster.settings.gateway.address
    print(f"\nTry:  splitserve generate --address {gw} \"Hello\"")
    print("Ctrl-C stops everything.", flush=True)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (terminal closed) stop `up` as Ctrl-C does, even mid-start."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


def _ignore_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _watch(cluster: LocalCluster, log_dir: Path) -> int:
    """Waits until a signal (0) or a service exits on its own (1)."""
    while True:
        dead = [s.name for s in cluster.services if not s.alive()]
        if dead:
            print(f"service(s) exited: {', '.join(dead)}; see {log_dir}; stopping",
                  file=sys.stderr)
            return 1
        time.sleep(1.0)  # a stop signal interrupts it (KeyboardInterrupt)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="splitserve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = _write_config(settings, log_dir)
    _ensure_secret(settings)
    models = ", ".join(f"{m.name} ({m.path})" for m in settings.served_models())
    print(f"starting {models}; logs in {log_dir}", flush=True)
    cluster = LocalCluster(settings, config_path, log_dir)
    _stop_on_signals()
    try:
        cluster.start()
        _print_endpoints(cluster)
        return _watch(cluster, log_dir)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"splitserve up failed: {e}", file=sys.stderr)
        return 1
    finally:
        _ignore_signals()
        print("stopping...", flush=True)
        cluster.stop()
