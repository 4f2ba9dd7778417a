"""What can be checked of the deployment files without Docker: the compose file, the Prometheus
and Grafana provisioning and the Dockerfile agree with each other and with the CLI defaults."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.engines import engine_names
from server.runtime.options import parse

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
    defaults = parse(["--repository", "x"]).listen
    gateway = compose["services"]["gateway"]
    opts = _options(gateway["command"])
    given = parse(["--repository", "x", "--ports", opts["ports"]]).listen
    ports = {"http": given.http_port, "grpc": given.grpc_port, "metrics": given.metrics_port}
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
        "gateway": parse(services["gateway"]["command"]).listen.metrics_port,
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


@dataclass
class Stage:
    image: str  # FROM's image, or the name of an earlier stage
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, value), continuations joined


def _stages(dockerfile: Path) -> list[Stage]:
    """The Dockerfile's build stages, from dockerfile-parse's instruction list (no comments)."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()))
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = value.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), value
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None, []))
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, value))
    return stages


def _chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """``stage`` and the earlier stages it is built FROM, oldest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].image in by_name:
        chain.insert(0, by_name[chain[0].image])
    return chain


def _values(chain: list[Stage], instruction: str) -> list[str]:
    return [v for s in chain for i, v in s.instructions if i == instruction]


def _exec_form(value: str) -> list[str]:
    """A JSON (exec form) argument list: shell form would run under /bin/sh and drop signals."""
    args = json.loads(value)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), value
    return args


def _pip_installs(chain: list[Stage]) -> list[tuple[str, set[str]]]:
    """(requirement, extras) of every ``pip install`` in RUN instructions of the chain."""
    out = []
    for run in _values(chain, "RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                for target in (w for w in words[words.index("install") + 1 :] if w[0] != "-"):
                    base, _, rest = target.partition("[")
                    extras = {e.strip() for e in rest.rstrip("]").split(",") if e.strip()}
                    out.append((base, extras))
    return out


def test_dockerfile_gateway_image() -> None:
    stages = _stages(ROOT / "Dockerfile")
    assert (stages[0].image, stages[0].name) == ("python:3.11-slim", "base")
    named = {s.name: s for s in stages if s.name}
    assert {"base", "gateway", "loadtest"} <= set(named)
    # a plain `docker build .` gives the gateway: the last stage is it, or is built FROM it
    assert stages[-1].name == "gateway" or (
        stages[-1].image == "gateway" and not stages[-1].instructions
    )
    gateway = _chain(stages, named["gateway"])
    assert [s.name for s in gateway] == ["base", "gateway"]
    if "gateway-baked" in named:  # the gateway plus the repository copied in
        baked = _chain(stages, named["gateway-baked"])
        assert [s.name for s in baked] == ["base", "gateway", "gateway-baked"]

    # runs as the unprivileged user that the base stage creates
    (user,) = _values(gateway, "USER")[-1:]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:")), user
    created = [
        shlex.split(c)[-1]
        for r in _values(gateway, "RUN")
        for c in r.split("&&")
        if shlex.split(c)[:1] == ["useradd"]
    ]
    assert user in created, (user, created)

    # the package with core dependencies only, plus every engine extra the builder may record
    installs = _pip_installs(gateway)
    assert [base for base, _ in installs] == ["."], installs
    extras = set().union(*(e for _, e in installs))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    assert not extras & {"build", "gpu", "dev"}, extras  # never torch, TensorRT or test tools
    core = {re.split(r"[<>=\[;! ]", d, maxsplit=1)[0] for d in project["dependencies"]}
    for engine in engine_names():  # the registry names the manifests record
        if engine in optional:
            assert engine in extras, f"engine {engine!r} needs extra [{engine}], image has {extras}"
        else:
            assert engine in core, f"engine {engine!r} is neither an extra nor a core dependency"

    # the CLI defaults, exposed, and the command line the entry point gets
    defaults = parse(["--repository", "x"]).listen
    ports = {defaults.http_port, defaults.grpc_port, defaults.metrics_port}
    exposed = {int(p) for v in _values(gateway, "EXPOSE") for p in v.split()}
    assert exposed == ports
    assert _exec_form(_values(gateway, "ENTRYPOINT")[-1]) == ["precision-serve"]
    assert project["scripts"]["precision-serve"] == "server.cli:main"
    cmd = parse(_exec_form(_values(gateway, "CMD")[-1]))
    assert {cmd.listen.http_port, cmd.listen.grpc_port, cmd.listen.metrics_port} == ports
    assert cmd.listen.host == "0.0.0.0"
    volumes = {v for value in _values(gateway, "VOLUME") for v in _exec_form(value)}
    assert str(cmd.routing.repository) in volumes  # the model repository is the mounted volume

    # the health check asks the ready endpoint on the HTTP port with Python (no curl in slim)
    (health,) = _values(gateway, "HEALTHCHECK")
    options, _, command = health.partition("CMD")
    assert {o.split("=")[0] for o in options.split()} >= {"--interval", "--timeout", "--retries"}
    args = _exec_form(command.strip())
    assert args[:2] == ["python", "-c"] and len(args) == 3, args
    code = args[2]
    compile(code, "HEALTHCHECK", "exec")  # valid Python
    assert f"http://127.0.0.1:{cmd.listen.http_port}/v2/health/ready" in code
    assert "curl" not in health

    # the load-test stage: Locust on the project's locustfile, also unprivileged
    loadtest = _chain(stages, named["loadtest"])
    assert {"loadtest"} <= set().union(*(e for _, e in _pip_installs(loadtest)))
    assert _values(loadtest, "USER")[-1] == user
    entry = _exec_form(_values(loadtest, "ENTRYPOINT")[-1])
    assert entry[:2] == ["locust", "-f"] and entry[2] == "/app/loadtest/locustfile.py"
    assert {int(p) for v in _values(loadtest, "EXPOSE") for p in v.split()} == {8089}

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_locust_service_options_are_known_to_the_locustfile(compose: dict[str, Any]) -> None:
    locust = compose["services"]["locust"]
    assert locust["build"]["target"] == "loadtest"
    opts = _options(locust["command"])
    gateway_grpc = parse(compose["services"]["gateway"]["command"]).listen.grpc_port
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
