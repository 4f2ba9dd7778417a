"""A real Prometheus server (Debian's /usr/bin/prometheus) for tests: loopback, OS-picked port,
temporary config and storage, stopped terminate -> wait -> kill."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from common import process
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def config_from_deploy(targets: dict[str, str], interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its jobs pointed at live servers (job -> HOST:PORT);
    jobs without a live server are dropped."""
    config = yaml.safe_load(DEPLOY_PROMETHEUS.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
            jobs.append(job)
    missing = set(targets) - {j["job_name"] for j in jobs}
    assert not missing, f"deploy/prometheus/prometheus.yml has no job(s) {missing}"
    config["scrape_configs"] = jobs
    return config


class PrometheusServer:
    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        for _attempt in range(3):  # a port picked free can be taken before Prometheus binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            cmd = [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            self.proc = process.start(cmd, log_path=self.log_path)
            try:
                log = self.log_path
                process.wait_ready(self._ready, timeout, "prometheus", proc=self.proc, log=log)
                return self
            except process.ProcessError:
                process.stop(self.proc)
        raise RuntimeError(f"prometheus did not start: {self.log_path.read_text()[-2000:]}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def targets_up(self) -> dict[str, str]:
        active = self.api("targets")["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    def stop(self) -> None:
        if self.proc is not None:
            process.stop(self.proc)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
