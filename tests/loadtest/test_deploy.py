"""What can be checked of the deployment files without Docker: the compose file, the Prometheus
and Grafana provisioning and the Dockerfile agree with each other and with the CLI defaults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SERVICES = {"triton", "gateway", "prometheus", "grafana", "locust"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _options(args: list[str]) -> dict[str, str]:
    """``--name=value`` items of a command list."""
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (relative to deploy/) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = (DEPLOY / source).resolve()
    return out


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for mapping in service.get("ports", []):
        host, container = str(mapping).split(":")
        out[int(container)] = int(host)
    return out


def test_services_and_mounted_paths_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        for target, source in _mounts(service).items():
            if source.name == "model_repository":  # built by precision-build, git keeps it empty
                assert source == ROOT / "model_repository", (name, source)
                continue
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"
        build = service.get("build")
        if build:
            assert (
                DEPLOY / build["context"] / build["dockerfile"]
            ).resolve() == ROOT / "Dockerfile"


def test_gateway_ports_agree_with_the_cli_defaults(compose: dict[str, Any]) -> None:
    defaults = build_parser().parse_args(["--repository", "x"])
    gateway = compose["services"]["gateway"]
    opts = _options(gateway["command"])
    ports = {
        "http": int(opts["http-port"]),
        "grpc": int(opts["grpc-port"]),
        "metrics": int(opts["metrics-port"]),
    }
    assert ports == {
        "http": defaults.http_port,
        "grpc": defaults.grpc_port,
        "metrics": defaults.metrics_port,
    }
    assert _published(gateway) == {p: p for p in ports.values()}  # published as the defaults
    assert opts["host"] == "0.0.0.0"  # reachable from the other containers
    assert opts["repository"] in _mounts(gateway)
    triton_opts = _options(compose["services"]["triton"]["command"])
    assert opts["upstream"] == f"triton://triton:{triton_opts['grpc-port']}"
    assert triton_opts["model-repository"] in _mounts(compose["services"]["triton"])
    # Triton keeps its defaults inside its container; on the host it must not collide
    triton_host_ports = set(_published(compose["services"]["triton"]).values())
    assert not triton_host_ports & set(ports.values())


def test_prometheus_targets_match_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom = services["prometheus"]
    config_path = _mounts(prom)[_options(prom["command"])["config.file"]]
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    metrics_port = {
        "gateway": int(_options(services["gateway"]["command"])["metrics-port"]),
        "triton": int(_options(services["triton"]["command"])["metrics-port"]),
    }
    jobs = {}
    for job in config["scrape_configs"]:
        (static,) = job["static_configs"]
        for target in static["targets"]:
            host, port = target.split(":")
            assert host in services, f"job {job['job_name']} scrapes {host}, not a service"
            assert int(port) == metrics_port[host], target
            jobs[job["job_name"]] = host
    assert jobs == {"precision-serve": "gateway", "triton": "triton"}
    # the dashboard's process panels select the gateway by this job name
    dashboard = (DEPLOY / "grafana" / "dashboards" / "precision-serve.json").read_text()
    assert 'job=\\"precision-serve\\"' in dashboard


def test_grafana_provisions_the_dashboard_and_datasource(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = {t: s for t, s in mounts.items() if t.startswith("/etc/grafana/provisioning")}
    (ds_dir,) = [s for t, s in provisioning.items() if t.endswith("/datasources")]
    (prov_dir,) = [s for t, s in provisioning.items() if t.endswith("/dashboards")]
    (ds_file,) = ds_dir.glob("*.yml")
    (datasource,) = yaml.safe_load(ds_file.read_text())["datasources"]
    prom_port = _options(compose["services"]["prometheus"]["command"])["web.listen-address"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus{prom_port}"

    (provider_file,) = prov_dir.glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]  # the provider reads a mounted folder
    assert dashboards_dir == DEPLOY / "grafana" / "dashboards"
    (dashboard_file,) = dashboards_dir.glob("*.json")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{dashboard_file.name}"

    dashboard = json.loads(dashboard_file.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])} | {
        p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p
    }
    assert uids == {datasource["uid"]}
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in (
        "request rate",
        "latency",
        "error",
        "fallback",
        "routing",
        "shadow",
        "batch",
        "triton queue",
        "triton compute",
        "cpu",
        "memory",
    ):
        assert wanted in titles, wanted


def test_dockerfile_gateway_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert stages[0] == ("python:3.11-slim", "base")
    names = {name for _, name in stages if name}
    assert {"gateway", "loadtest"} <= names
    assert stages[-1][0] == "gateway"  # a plain `docker build .` gives the gateway
    gateway = text.split("AS gateway\n", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^USER\s+serve$", gateway, re.MULTILINE)  # not root
    assert re.search(r"^EXPOSE\s+8000 8001 8002$", gateway, re.MULTILINE)
    health = gateway.split("HEALTHCHECK", 1)[1].split("\nENTRYPOINT", 1)[0]
    assert "urllib" in health and "/v2/health/ready" in health and "curl" not in health
    # the core plus OpenVINO (variants the builder recorded as `engine: openvino`), never torch
    assert re.search(r"^RUN pip install '\.\[openvino\]'$", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_locust_service_options_are_known_to_the_locustfile(compose: dict[str, Any]) -> None:
    locust = compose["services"]["locust"]
    assert locust["build"]["target"] == "loadtest"
    opts = _options(locust["command"])
    gateway_grpc = _options(compose["services"]["gateway"]["command"])["grpc-port"]
    assert opts["host"] == f"gateway:{gateway_grpc}"
    assert opts["repository"] in _mounts(locust)
    # Locust rejects unknown options; with no users it never connects to the (absent) gateway.
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            *locust["command"],
            "--headless",
            "--users=0",
            "--run-time=1s",
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unrecognized arguments" not in run.stderr
