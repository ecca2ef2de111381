"""`splitserve up`: the whole cluster as local processes, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from services.common.launcher import LocalCluster
from services.common.settings import ClusterSettings, load_settings


def _write_config(settings: ClusterSettings, log_dir: Path) -> Path:
    path = log_dir / "cluster.yaml"
    settings.dump_yaml(path)
    return path


def _print_endpoints(cluster: LocalCluster) -> None:
    print("SplitServe is up:")
    for svc in cluster.services:
        ep = svc.endpoint
        http = f"  http://{ep.host}:{ep.http_port}/metrics" if ep.http_port else ""
        print(f"  {svc.name:<10} grpc {ep.address}{http}")
    gw = cluster.settings.gateway.address
    print(f"\nTry:  splitserve generate --address {gw} \"Hello\"")
    print("Ctrl-C stops everything.", flush=True)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="splitserve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = _write_config(settings, log_dir)
    print(f"starting {settings.model.name} ({settings.model.path}); logs in {log_dir}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = LocalCluster(settings, config_path, log_dir)
    try:
        cluster.start()
        _print_endpoints(cluster)
        while not stop.wait(1.0):
            dead = [s.name for s in cluster.services if not s.alive()]
            if dead:
                print(f"service(s) exited: {', '.join(dead)}; see {log_dir}; stopping")
                return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        print(f"splitserve up failed: {e}")
        return 1
    finally:
        print("stopping...", flush=True)
        cluster.stop()
    return 0
