"""Start and stop a local Triton server on a precision-serve repository.

``TritonServer`` derives a python-backend repository (server.launcher.derive) in a work folder,
lays out the python backend from the ``nvidia-pytriton`` wheel, starts ``tritonserver`` with its
logs in a file, waits until it reports ready (tritonclient health), and stops it with
terminate -> wait -> kill. Ports given as 0 are picked by the OS (tritonserver wants explicit
ports, so a bind-to-0 probe picks them; a start that loses the race for a port is retried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from common import process
from server.launcher.derive import DerivedModel, derive_repository
from server.launcher.distribution import TritonDistribution, find_distribution
from server.launcher.errors import TritonStartError

log = logging.getLogger(__name__)

MODEL_CONTROL_MODES = ("none", "explicit")
# Triton's GPU/driver probes on a CPU host: not the reason anything failed.
_NOISE = ("CudaDriverHelper", "NVML", "DCGM", "cuda", "CUDA")


@dataclass
class TritonOptions:
    """How to run one local Triton server."""

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0: picked by the OS
    http_port: int = 8000
    metrics_port: int = 8002
    model_control: str = "none"  # "explicit": models can be loaded/unloaded through the API
    log_file: Path | None = None  # default: <work_dir>/tritonserver.log
    work_dir: Path | None = None  # default: a temporary folder removed on stop
    threads: int = 1  # engine threads per model instance (0: the engine decides)
    startup_timeout: float = 120.0
    exit_timeout: int = 5  # seconds Triton waits for in-flight requests on SIGTERM
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}"
            )
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {self.startup_timeout}")


def _probe_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports on ``host``. Triton cannot bind port 0 itself, so the ports
    are picked here; every socket stays bound until all are picked (a port probed and released
    can be handed out again at once: a gRPC and a metrics port once came out equal, and
    tritonserver refused to start)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def stub_environment_dir() -> Path:
    """The Python environment the python-backend stub will use: this interpreter's.

    The stub embeds the system's libpython in isolated mode (PYTHONPATH is ignored); it finds its
    standard library and site-packages from the first ``python3`` on PATH (a virtual
    environment's ``pyvenv.cfg`` included), so the server's PATH starts with this environment's
    ``bin`` - the same approach PyTriton takes.
    """
    return Path(sys.exec_prefix)


def check_stub_environment(env_dir: Path | None = None) -> str:
    """Fail early, with a clear message, where the stub could not run our python model.

    Runs the environment's ``python3`` isolated (as the stub will) and imports numpy and the engine
    registry; numpy 2 is refused (with it every python-backend response came back empty).
    Returns the numpy version.
    """
    python = (env_dir or stub_environment_dir()) / "bin" / "python3"
    if not python.exists():
        raise TritonStartError(f"no python3 in {python.parent} for the python-backend stub")
    probe = "import numpy, common.engines; print(numpy.__version__)"
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TritonStartError(f"cannot run {python}: {e}") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise TritonStartError(
            f"the python-backend stub could not import our package from {python} ({last}); "
            "install precision-serve into that environment (pip install -e .)"
        )
    version = done.stdout.strip()
    if int(version.split(".")[0]) >= 2:
        raise TritonStartError(
            f"numpy {version} in {python}: Triton's python backend (nvidia-pytriton) needs numpy<2"
        )
    return version


def server_environment(
    dist: TritonDistribution, base: dict[str, str] | None = None, env_dir: Path | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(dist.libs_dir), env.get("LD_LIBRARY_PATH", "")) if p
    )
    bin_dir = str((env_dir or stub_environment_dir()) / "bin")
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    return env


class TritonServer:
    """A local ``tritonserver`` process; a context manager (start on enter, stop on exit)."""

    def __init__(self, options: TritonOptions, distribution: TritonDistribution | None = None):
        self.options = options
        self._dist = distribution
        self._proc: subprocess.Popen | None = None
        self._own_work_dir = False
        self.work_dir: Path | None = None
        self.log_file: Path | None = None
        self.models: list[DerivedModel] = []
        self.grpc_port = options.grpc_port
        self.http_port = options.http_port
        self.metrics_port = options.metrics_port
        self.startup_seconds: float | None = None
        self._log_offset = 0

    # ---- addresses --------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- preparation ------------------------------------------------------------------------
    def _prepare(self) -> None:
        opts = self.options
        self._dist = self._dist or find_distribution()
        check_stub_environment()
        if opts.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="precision-serve-triton-"))
            self._own_work_dir = True
        else:
            self.work_dir = Path(opts.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.models = derive_repository(opts.repository, self.work_dir / "models", opts.threads)
        self._dist.prepare_backends(self.work_dir / "backends")
        self.log_file = Path(opts.log_file) if opts.log_file else self.work_dir / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        assert self._dist is not None and self.work_dir is not None
        opts = self.options
        cmd = [
            str(self._dist.binary),
            f"--model-repository={self.work_dir / 'models'}",
            f"--backend-directory={self.work_dir / 'backends'}",
            f"--model-control-mode={opts.model_control}",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--exit-timeout-secs={opts.exit_timeout}",
            f"--log-verbose={opts.log_verbose}",
            f"--grpc-address={opts.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={opts.host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={opts.host}",
            f"--metrics-port={self.metrics_port}",
        ]
        if opts.model_control == "explicit":
            cmd.append("--load-model=*")
        return cmd + list(opts.extra_args)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> TritonServer:
        if self.running:
            return self
        try:
            self._prepare()
        except BaseException:
            self._cleanup()
            raise
        attempts = (
            3
            if 0 in (self.options.grpc_port, self.options.http_port, self.options.metrics_port)
            else 1
        )
        for attempt in range(attempts):
            self._pick_ports()
            try:
                self._launch()
                return self
            except TritonStartError as e:
                if attempt + 1 < attempts and self._lost_port_race():
                    log.warning("tritonserver lost a port race, retrying: %s", e.args[0][:200])
                    continue
                self._cleanup()
                raise
        raise AssertionError("unreachable")

    def _lost_port_race(self) -> bool:
        """Whether start-up failed because a port *we picked* was taken in the meantime."""
        picked = [
            port
            for port, asked in (
                (self.grpc_port, self.options.grpc_port),
                (self.http_port, self.options.http_port),
                (self.metrics_port, self.options.metrics_port),
            )
            if asked == 0
        ]
        text = "\n".join(self.log_errors(limit=50))
        return "already in use" in text and any(f":{port}'" in text for port in picked)

    def _pick_ports(self) -> None:
        o = self.options
        picked = iter(_probe_ports(o.host, [o.grpc_port, o.http_port, o.metrics_port].count(0)))
        self.grpc_port = o.grpc_port or next(picked)
        self.http_port = o.http_port or next(picked)
        self.metrics_port = o.metrics_port or next(picked)

    def _launch(self) -> None:
        assert self._dist is not None and self.log_file is not None
        started = time.monotonic()
        with open(self.log_file, "ab") as logf:
            self._log_offset = logf.tell()
            logf.write(f"\n==== {' '.join(self.command())}\n".encode())
            logf.flush()
        self._proc = process.start(
            self.command(),
            log_path=self.log_file,
            env=server_environment(self._dist),
            new_session=True,  # its own process group: the stubs go down with it
        )
        log.info("tritonserver pid %d starting (log: %s)", self._proc.pid, self.log_file)
        try:
            self._wait_ready(started)
        except TritonStartError:
            self._terminate(grace=5.0)
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "tritonserver ready in %.1fs: grpc %s http %s metrics %s",
            self.startup_seconds,
            self.grpc_url,
            self.http_url,
            self.metrics_url,
        )

    def _wait_ready(self, started: float) -> None:
        import tritonclient.grpc as grpcclient

        remaining = max(started + self.options.startup_timeout - time.monotonic(), 0.0)
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            process.wait_ready(
                lambda: client.is_server_ready(client_timeout=2.0) and self._http_ok(),
                remaining,
                "tritonserver",
                proc=self._proc,
                interval=0.2,
            )
        except process.ProcessExited as e:
            raise TritonStartError(
                self._failure(f"exited with code {e.returncode} during start-up")
            ) from None
        except process.ReadyTimeout:
            raise TritonStartError(
                self._failure(f"not ready after {self.options.startup_timeout:.0f}s")
            ) from None
        finally:
            client.close()

    def _http_ok(self) -> bool:
        """HTTP and metrics answer too (Triton starts them after gRPC and exits if one fails)."""
        for url in (f"http://{self.http_url}/v2/health/ready", self.metrics_url):
            try:
                with urllib.request.urlopen(url, timeout=2.0) as r:
                    if r.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return self._proc is not None and self._proc.poll() is None

    def _failure(self, what: str) -> str:
        """One line naming Triton's first error (a model that failed to load...), then the log."""
        errors = self.log_errors()
        first = f": {errors[0]}" if errors else ""
        return f"tritonserver {what}{first} (log {self.log_file})\n{self.log_tail()}"

    def log_errors(self, limit: int = 5) -> list[str]:
        """Messages of Triton's error lines (``E1122 hh:mm:ss pid file.cc:N] "message"``)."""
        text = self._read_log()
        found: list[str] = []
        for line in text.splitlines():
            if line.startswith("E") and "] " in line[:80]:
                message = line.split("] ", 1)[1].strip().strip('"')
                message = message.split("\\n")[0].replace("ERROR: ", "")
                if message not in found:
                    found.append(message)
            elif line.startswith("error: "):
                found.append(line[len("error: ") :])
        # "failed to load 'digits_int8' version 1: ...", "failed to start GRPC service: ...
        # Socket '127.0.0.1:8001' already in use" say what went wrong: show those first.
        found = [m for m in found if not any(n in m for n in _NOISE)]
        found.sort(key=lambda m: not ("failed to load '" in m or "failed to start" in m))
        return found[:limit]

    def _read_log(self) -> str:
        """This launch's part of the log file (earlier runs may have appended to it too)."""
        if self.log_file is None:
            return ""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._read_log().splitlines()[-lines:])

    def _terminate(self, grace: float) -> int | None:
        if self._proc is None:
            return None
        # its group was created for this server: python-backend stubs left behind are killed too
        return process.stop(self._proc, grace, group=True)

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (what a crashed replica looks like)."""
        if self._proc is not None:
            process.kill(self._proc, group=True)

    def stop(self, grace: float | None = None) -> int | None:
        """terminate -> wait -> kill; returns the exit code."""
        wait = grace if grace is not None else self.options.exit_timeout + 5.0
        code = self._terminate(wait)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        """Remove a temporary work folder (keeping it while it holds the only copy of the log)."""
        if not self._own_work_dir or self.work_dir is None:
            return
        if self.options.log_file:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        else:
            for sub in ("models", "backends"):
                shutil.rmtree(self.work_dir / sub, ignore_errors=True)
            with contextlib.suppress(OSError):  # gone when no log was written into it
                self.work_dir.rmdir()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(repository: Path, **kwargs: object) -> TritonServer:
    """``TritonServer(TritonOptions(repository, **kwargs)).start()``."""
    return TritonServer(TritonOptions(repository=Path(repository), **kwargs)).start()  # type: ignore[arg-type]


__all__ = [
    "TritonOptions",
    "TritonServer",
    "check_stub_environment",
    "server_environment",
    "start_server",
]
