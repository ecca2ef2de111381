"""deploy/: the compose and Kubernetes files validate offline and describe the same
cluster as `splitserve up` (services, ports, one config file)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common.settings import ClusterSettings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLES = ("kvstore", "prefill", "decode", "gateway")
CONFIG_IN_CONTAINER = "/etc/splitserve/cluster.yaml"


def _ports(settings: ClusterSettings) -> dict[str, tuple[int, int]]:
    return {
        "kvstore": (settings.kvstore.port, settings.kvstore.http_port),
        "prefill": (settings.prefill[0].port, settings.prefill[0].http_port),
        "decode": (settings.decode[0].port, settings.decode[0].http_port),
        "gateway": (settings.gateway.port, settings.gateway.http_port),
    }


def _hosts(settings: ClusterSettings) -> dict[str, str]:
    return {"kvstore": settings.kvstore.host, "prefill": settings.prefill[0].host,
            "decode": settings.decode[0].host, "gateway": settings.gateway.host}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_validate_against_the_compose_spec(name: str) -> None:
    tool = shutil.which("check-jsonschema")
    assert tool, "check-jsonschema is a dev dependency"
    done = _run(tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / name))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_manifests_render_and_validate(overlay: str, tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (for kustomize) is not installed")
    rendered = _run("kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "all.yaml"
    out.write_text(rendered.stdout)
    done = _run(shutil.which("kubernetes-validate") or "kubernetes-validate", "--strict",
                str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if not line.startswith("INFO") and "kind ServiceMonitor" not in line]
    assert not problems, problems  # the ServiceMonitor CRD has no built-in schema
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered.stdout)}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    if overlay == "gpu":
        workers = [d for d in yaml.safe_load_all(rendered.stdout) if d["kind"] == "Deployment"
                   and d["metadata"]["name"] in ("splitserve-prefill", "splitserve-decode")]
        assert all(d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                   == {"nvidia.com/gpu": 1} for d in workers)


def test_compose_topology_is_the_one_of_splitserve_up() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    config = load_settings(DEPLOY / "cluster.yaml")
    default = ClusterSettings()  # what `splitserve up` starts
    assert _ports(config) == _ports(default)
    assert _hosts(config) == {role: role for role in ROLES}  # peers dial service names
    for role in ROLES:
        svc = services[role]
        command = svc["command"]
        assert command[:2] == ["serve", role]
        assert command[command.index("--config") + 1] == CONFIG_IN_CONTAINER
        assert command[command.index("--bind") + 1] == "0.0.0.0"
        mounts = svc.get("volumes") or compose["x-splitserve"]["volumes"]
        assert f"./cluster.yaml:{CONFIG_IN_CONTAINER}:ro" in mounts
        grpc_port, http_port = _ports(config)[role]
        published = {str(p).split(":")[-1] for p in svc.get("ports", []) + svc.get("expose", [])}
        assert {str(grpc_port), str(http_port)} <= published, role
        assert svc["environment"]["SPLITSERVE_HTTP_PORT"] == str(http_port)
    assert {"redis", "prometheus", "grafana"} <= set(services)
    targets = {t for sc in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())[
        "scrape_configs"] for st in sc["static_configs"] for t in st["targets"]}
    assert targets == {f"{role}:{_ports(config)[role][1]}" for role in ROLES}


def test_kubernetes_config_has_the_same_ports_and_roles() -> None:
    k8s = load_settings(DEPLOY / "k8s" / "base" / "cluster.yaml")
    assert _ports(k8s) == _ports(ClusterSettings())
    assert _hosts(k8s) == {role: f"splitserve-{role}" for role in ROLES}
    gpu = load_settings(DEPLOY / "k8s" / "overlays" / "gpu" / "cluster.yaml")
    assert (_ports(gpu), gpu.model.device) == (_ports(k8s), "cuda")
    assert load_settings(DEPLOY / "cluster.gpu.yaml").model.device == "cuda"


def test_dockerfile_runs_every_role_as_a_non_root_user_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["splitserve"]' in text
    assert "ARG BASE=" in text and "ARG TORCH_INDEX=" in text  # CPU and CUDA variants
