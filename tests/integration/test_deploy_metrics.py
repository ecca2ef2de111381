"""Every metric the Grafana dashboard (and the autoscaler rules) query exists in the
/metrics of live services."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from tests.integration.conftest import RunningCluster, request

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _queried_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/splitserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((DEPLOY / "k8s/prometheus-adapter-values.yaml").read_text())
    return {m for e in exprs for m in re.findall(r"splitserve_[a-z0-9_]+", e)
            if m != "splitserve_ttft_p90_seconds"}  # the adapter's name, not a series


def _exposed(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE splitserve_"):  # declared, even before a first sample
            names.add(line.split()[2])
        elif line.startswith("splitserve_"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_dashboard_metrics_exist_in_live_services(split_cluster: RunningCluster) -> None:
    split_cluster.generate(request([5, 6, 7, 8] * 10, max_tokens=4))
    s = split_cluster.settings
    ports = [s.gateway.http_port, s.kvstore.http_port] + [
        e.http_port for e in s.prefill + s.decode]
    exposed = set().union(*(_exposed(p) for p in ports))
    queried = _queried_metrics()
    assert len(queried) >= 10
    missing = sorted(m for m in queried if m not in exposed
                     and not any(m.endswith(x) and m[: -len(x)] in exposed for x in SUFFIXES)
                     and not any(m + x in exposed for x in SUFFIXES))
    assert not missing, f"the dashboard queries metrics no service exposes: {missing}"
