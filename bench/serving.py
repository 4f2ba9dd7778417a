"""Serving overhead and the gateway's ceiling.

The same variant and the same input rows through four paths:

- (a) ``inprocess``: the variant's engine session in this process (threads calling ``run``);
- (b) ``gateway``: the gateway with its embedded upstream
(``server.runtime.runner.GatewayProcess``); - (c) ``triton``: a local Triton server
(``server.launcher.tritonserver.TritonServer``, its python
  backend running the same engine);
- (d) ``gateway_triton``: the gateway with ``--upstream triton://...?front=python`` to that
  Triton: the Python pass-through;
- (e) ``echo``: a bare grpc.aio server answering at once (:mod:`lab.floors.echo_server`), no model:
  the floor of one Python gRPC hop on this host at this moment;
- (f) ``kserve``: KServe's Python ``ModelServer`` running the same file, and (g)
  ``gateway_workers2``: the gateway with ``--workers 2`` (:mod:`bench.peer_paths`);
- (h) ``bare_aio`` and (i) ``bare_sync``: the same engine behind nothing but parse-run-reply, on
  grpc.aio and on grpc's sync server, (j) ``bare_forward``: a grpc.aio server passing the bytes to
  that Triton, and (k) ``bare_forward_http``: the same over Triton's HTTP port on raw sockets
  (:mod:`lab.floors.bare_server`, :mod:`lab.floors.http_forward`): the floors with the model, what
  no handler on those frameworks beats without batching (each on the gateway's loop);
- (l) ``gateway_envoy``: the gateway with ``--upstream triton://...?front=envoy`` to that Triton:
  Envoy (server/front) in the data path, the gateway behind it as the control plane; its CPU is
  the gateway's process tree (the gateway and its Envoy). ``front=envoy`` is named because the
  default, ``auto``, keeps the Python front ahead of a Triton older than 2.53 (pytriton's 2.51
  here), which crashes on the stream resets Envoy sends for cancelled calls.

The servers get a repository holding only the measured variants (links to the built ones), so
neither loads anything else. All four run at once and are measured round-robin - per round, per
variant, per concurrency, every path in turn - with the light clients of :mod:`bench.clients`;
medians over the rounds. Every path's answer is first checked against the in-process output.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import clients, profiling
from bench.engine_level import load_samples, rows
from bench.stats import median
from common.engines import get_engine
from common.model_repository import load_manifest, manifest_path

ORT_ENGINE = "onnxruntime"
# Paths that run the ONNX file on ONNX Runtime whatever the manifest's engine.
ORT_PATHS = frozenset({"kserve"})
# Each serving path: its short name (the targets' words) and the rest of its label (the
# report's rows, bench/report.py PATH_LABELS).
PATH_NAMES: dict[str, tuple[str, str]] = {
    "inprocess": ("(a) in-process engine", ""),
    "gateway": ("(b) gateway", ", embedded upstream"),
    "triton": ("(c) Triton direct", " (python backend)"),
    "gateway_triton": ("(d) gateway -> Triton", ", Python front (`?front=python`)"),
    "echo": ("(e) bare gRPC echo", ", no model (floor)"),
    "kserve": ("(f) KServe 0.21 ModelServer", " (same file, ONNX Runtime)"),
    "gateway_workers2": ("(g) gateway --workers 2", ", embedded upstream"),
    "bare_aio": ("(h) bare grpc.aio server", ", same engine (parse, run, reply)"),
    "bare_sync": ("(i) bare grpc sync server", ", same engine (parse, run, reply)"),
    "bare_forward": ("(j) bare grpc.aio forwarder", " -> Triton (bytes in, bytes out)"),
    "bare_forward_http": ("(k) bare forwarder over HTTP", " -> Triton's HTTP port (raw sockets)"),
    "gateway_envoy": ("(l) gateway -> Triton", ", Envoy front (front=envoy)"),
}
PATHS = tuple(PATH_NAMES)
# Paths whose server runs in several processes: no CPU-time figure from one pid.
MULTIPROCESS = ("triton", "gateway_workers2")
# Paths whose server CPU is a process tree: the gateway and the Envoy front it supervises.
PROCESS_TREE = ("gateway_envoy",)
# Paths that need the local Triton (skipped with --no-triton).
TRITON_PATHS = ("triton", "gateway_triton", "bare_forward", "bare_forward_http", "gateway_envoy")
SETTLE_SECONDS = 0.1


@dataclass
class ServingWindows:
    rounds: int = 3
    concurrencies: tuple[int, ...] = (1, 4, 16)
    seconds: float = 2.5  # per window
    warmup: float = 0.5
    ceiling_concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    ceiling_seconds: float = 2.0
    ceiling_p99_ms: float = 10.0


def subset_repository(repository: Path, dest: Path, wanted: list[tuple[str, str]]) -> Path:
    """A repository in ``dest`` with only the ``(model, precision)`` variants in ``wanted``:
    filtered manifests, variant folders linked to the built ones."""
    dest.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[str]] = {}
    for model, precision in wanted:
        by_model.setdefault(model, []).append(precision)
    for model, precisions in by_model.items():
        manifest = load_manifest(manifest_path(repository, model))
        missing = [p for p in precisions if p not in manifest.variants]
        if missing:
            raise ValueError(f"{model} has no {', '.join(missing)} variant in {repository}")
        manifest.variants = {p: manifest.variants[p] for p in precisions}
        for v in manifest.variants.values():
            link = dest / v.triton_name
            if not link.exists():
                link.symlink_to((Path(repository) / v.triton_name).resolve())
        manifest.save(dest)
    return dest


class Servers:
    """Gateway (embedded), Triton, gateway -> Triton on one repository; each may fail alone."""

    def __init__(
        self,
        repository: Path,
        threads: int,
        with_triton: bool,
        log: Callable,
        wanted: list[tuple[str, str]] | None = None,
        source: Path | None = None,
    ) -> None:
        self.repository = repository
        self.wanted = wanted or []
        self.source = source or repository
        self.threads = threads
        self.with_triton = with_triton
        self.log = log
        self.targets: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.gateway: Any = None
        self.procs: dict[str, Any] = {}
        self.startup_seconds: dict[str, float] = {}
        self._stack = contextlib.ExitStack()

    def _start(self, name: str, factory: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            server = self._stack.enter_context(factory())
        except Exception as e:
            self.errors[name] = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            self.log(f"  {name}: failed to start: {self.errors[name][:200]}")
            return None
        self.startup_seconds[name] = round(time.perf_counter() - t0, 2)
        self.targets[name] = server.grpc_url
        self.procs[name] = server
        self.log(f"  {name}: ready at {server.grpc_url} in {self.startup_seconds[name]}s")
        return server

    def __enter__(self) -> Servers:
        from lab.floors.bare_server import BareServer
        from lab.floors.echo_server import EchoServer
        from server.runtime.runner import GatewayProcess

        self._start("echo", EchoServer)
        for mode in ("aio", "sync"):
            self._start(
                f"bare_{mode}",
                lambda mode=mode: BareServer(
                    mode, repository=self.repository, threads=self.threads
                ),
            )
        args = ["--upstream", f"embedded?threads={self.threads}", "--log-level", "ERROR"]
        self.gateway = self._start(
            "gateway", lambda: GatewayProcess(self.repository, args, timeout=300)
        )
        if self.wanted:
            from bench.peer_paths import start_peer_paths

            start_peer_paths(self, self.wanted, self.source, args)
        if not self.with_triton:
            for path in TRITON_PATHS:
                self.errors[path] = "skipped (--no-triton)"
            return self
        from server.launcher.tritonserver import TritonOptions, TritonServer

        opts = TritonOptions(
            repository=self.repository,
            grpc_port=0,
            http_port=0,
            metrics_port=0,
            threads=self.threads,
            startup_timeout=300,
        )
        triton = self._start("triton", lambda: TritonServer(opts))
        if triton is None:
            for path in TRITON_PATHS[1:]:
                self.errors[path] = "Triton did not start"
            return self
        up = [*args, "--upstream", f"triton://{triton.grpc_url}?front=python"]
        self._start("gateway_triton", lambda: GatewayProcess(self.repository, up, timeout=300))
        envoy = [*args, "--upstream", f"triton://{triton.grpc_url}?front=envoy"]
        self._start("gateway_envoy", lambda: GatewayProcess(self.repository, envoy, timeout=300))
        self._start("bare_forward", lambda: BareServer("forward", forward=triton.grpc_url))
        self._start(
            "bare_forward_http", lambda: BareServer("forward-http", forward=triton.http_url)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@dataclass
class Target:
    model: str
    precision: str
    triton_name: str
    session: Any
    feeds: dict[str, np.ndarray]
    payload: bytes
    expected: np.ndarray
    # KServe's peer runs the same ONNX file on ONNX Runtime whatever engine the manifest chose;
    # its answer is checked against ONNX Runtime's output (OpenVINO's INT8 kernels round
    # differently: an engine difference, not a serving error).
    expected_onnxruntime: np.ndarray


def load_targets(repository: Path, wanted: list[tuple[str, str]], threads: int) -> list[Target]:
    """Each wanted variant loaded in-process, with one request row and the reference answer."""
    out = []
    for model, precision in wanted:
        manifest = load_manifest(manifest_path(repository, model))
        v = manifest.variants[precision]
        session = get_engine(v.engine).load(repository / v.file, v.engine_options, threads)
        feeds = rows(load_samples(repository, model), 1)
        first = session.outputs[0].name
        expected = np.asarray(session.run(feeds)[first])
        expected_ort = expected
        if v.engine != ORT_ENGINE:
            ort = get_engine(ORT_ENGINE).load(repository / v.file, {}, threads)
            expected_ort = np.asarray(ort.run(feeds)[first])
        payload = clients.infer_request_bytes(v.triton_name, feeds)
        out.append(
            Target(model, precision, v.triton_name, session, feeds, payload, expected, expected_ort)
        )
    return out


def _check(target: Target, address: str, path: str) -> dict[str, Any]:
    """Does this path answer with the in-process engine's output?"""
    if path == "echo":
        return {"ok": True, "note": "no model (floor)"}
    try:
        outputs, params = clients.decode_response(clients.grpc_call(address, target.payload))
    except Exception as e:
        return {"ok": False, "error": " ".join(str(e).split())[:300]}
    got = next(iter(outputs.values()), None)
    expected = target.expected_onnxruntime if path in ORT_PATHS else target.expected
    if got is None or got.shape != expected.shape:
        shape = None if got is None else list(got.shape)
        return {"ok": False, "error": f"output shape {shape}, expected {expected.shape}"}
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    return {
        "ok": diff <= 1e-3,
        "max_abs_diff": diff,
        "reference_engine": ORT_ENGINE if path in ORT_PATHS else "manifest",
        "precision_parameter": params.get("precision"),
    }


def _window(path: str, target: Target, servers: Servers, c: int, w: ServingWindows) -> dict:
    if path == "inprocess":
        out = clients.inprocess_window(target.session, target.feeds, c, w.seconds, w.warmup)
        out["process_cpu_ms_per_request"] = out.pop("client_cpu_ms_per_request")
        return out
    proc = servers.procs.get(path) if path not in MULTIPROCESS else None
    metrics = getattr(proc, "metrics_url", None)  # the gateway's: requests per run
    batches0 = profiling.batch_totals(metrics) if metrics else None
    cpu_of = (
        profiling.process_tree_cpu_seconds
        if path in PROCESS_TREE
        else profiling.process_cpu_seconds
    )
    cpu0, wall0 = (cpu_of(proc.pid) if proc else None), time.perf_counter()
    out = clients.grpc_window(servers.targets[path], target.payload, c, w.seconds, w.warmup)
    wall = time.perf_counter() - wall0
    cpu1 = cpu_of(proc.pid) if proc else None
    if batches0 is not None:
        rows, runs = (b - a for a, b in zip(batches0, profiling.batch_totals(metrics), strict=True))
        if runs:  # rows per engine run (embedded)
            out["requests_per_run"] = round(rows / runs, 2)
    if cpu0 is not None and cpu1 is not None and out["requests"]:
        # the warm-up ran too: count the measured window's share of the wall time
        cpu = (cpu1 - cpu0) * out["seconds"] / wall
        out["server_cpu_ms_per_request"] = round(1000 * cpu / out["requests"], 4)
    return out


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["requests"]]
    cpu = [r.get("server_cpu_ms_per_request", r.get("process_cpu_ms_per_request")) for r in ok]
    cpu = [c for c in cpu if c is not None]
    per = [r["requests_per_run"] for r in ok if "requests_per_run" in r]
    return {
        "rps": round(median(r["rps"] for r in ok), 2) if ok else None,
        "p50_ms": round(median(r["p50_ms"] for r in ok), 4) if ok else None,
        "p99_ms": round(median(r["p99_ms"] for r in ok), 4) if ok else None,
        "server_cpu_ms_per_request": round(median(cpu), 4) if cpu else None,
        "requests_per_run": round(median(per), 2) if per else None,
        "errors": sum(r["errors"] for r in runs),
        "rounds": runs,
    }


def _ratios(paths: dict[str, dict[str, dict[str, Any]]], concurrencies: tuple[int, ...]) -> dict:
    def get(p: str, c: int, k: str) -> float | None:
        return paths.get(p, {}).get(str(c), {}).get(k)

    out: dict[str, Any] = {}
    for num, den, label in (
        ("gateway", "inprocess", "b_over_a"),
        ("gateway_triton", "triton", "d_over_c"),
        ("gateway_envoy", "triton", "l_over_c"),
    ):
        r: dict[str, Any] = {}
        for c in concurrencies:
            a, b = get(den, c, "rps"), get(num, c, "rps")
            if a and b:
                r[f"throughput_c{c}"] = round(b / a, 3)
        a, b = get(den, 1, "p50_ms"), get(num, 1, "p50_ms")
        if a is not None and b is not None:
            r["p50_added_ms_c1"] = round(b - a, 3)
        out[label] = r
    # the Envoy front's CPU per request against the Python front's (issue 34: <= 0.4x)
    cpu = {
        f"c{c}": round(x / y, 3)
        for c in concurrencies
        if (x := get("gateway_envoy", c, "server_cpu_ms_per_request"))
        and (y := get("gateway_triton", c, "server_cpu_ms_per_request"))
    }
    if cpu:
        out["l_over_d_server_cpu"] = cpu
    a, e = get("gateway", 1, "p50_ms"), get("echo", 1, "p50_ms")
    if a is not None and e is not None:
        out["gateway_minus_echo_p50_ms_c1"] = round(a - e, 3)
    return out


def measure_serving(
    repository: Path,
    wanted: list[tuple[str, str]],
    threads: int,
    windows: ServingWindows,
    with_triton: bool = True,
    ceiling_model: tuple[str, str] | None = ("digits", "int8"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sections 2 and 3 of the benchmark (see the module docstring and bench.run)."""
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        subset = subset_repository(Path(repository), Path(tmp) / "repo", wanted)
        targets = load_targets(Path(repository), wanted, threads)
        with Servers(subset, threads, with_triton, log, wanted, Path(repository)) as servers:
            result = _measure(targets, servers, windows, log)
            if ceiling_model and servers.gateway is not None:
                t = next(t for t in targets if (t.model, t.precision) == ceiling_model)
                result["ceiling"] = gateway_ceiling(t, servers, windows, log)
                result["gateway_breakdown"] = gateway_breakdown(t, servers, "gateway", windows)
                result["gateway_cprofile"] = gateway_cprofile(subset, t, threads, windows, log)
                result["threads_ablation"] = threads_ablation(
                    subset, Path(repository), ceiling_model, windows, log
                )
                if "gateway_triton" in servers.targets:
                    result["gateway_triton_breakdown"] = gateway_breakdown(
                        t, servers, "gateway_triton", windows
                    )
                from bench.peer_paths import perf_analyzer_over_paths, pyspy_over_paths

                result["perf_analyzer"] = perf_analyzer_over_paths(servers, t, windows.seconds, log)
                result["py_spy"] = pyspy_over_paths(servers, t, max(2.0, windows.seconds), log)
            if servers.gateway is not None:
                result["gateway_c4_breakdown"] = {
                    t.triton_name: gateway_breakdown(t, servers, "gateway", windows, 4)
                    for t in targets
                }
        result["startup_seconds"] = servers.startup_seconds
        result["path_errors"] = servers.errors
    return result


def _measure(
    targets: list[Target], servers: Servers, windows: ServingWindows, log: Callable
) -> dict[str, Any]:
    live = ["inprocess", *[p for p in PATHS[1:] if p in servers.targets]]
    checks = {
        t.triton_name: {p: _check(t, servers.targets[p], p) for p in live[1:]} for t in targets
    }
    for name, per_path in checks.items():
        for p, c in per_path.items():
            if not c["ok"]:
                log(f"  {name} via {p}: answer check failed: {c}")
    raw: dict[str, dict[str, dict[str, list]]] = {
        t.triton_name: {p: {str(c): [] for c in windows.concurrencies} for p in live}
        for t in targets
    }
    for r in range(windows.rounds):
        for t in targets:
            for c in windows.concurrencies:
                order = live[r % len(live) :] + live[: r % len(live)]
                for p in order:
                    time.sleep(SETTLE_SECONDS)
                    raw[t.triton_name][p][str(c)].append(_window(p, t, servers, c, windows))
        log(f"  serving: round {r + 1}/{windows.rounds} done")
    variants = {}
    for t in targets:
        paths = {
            p: {c: _summarise(runs) for c, runs in per_c.items()}
            for p, per_c in raw[t.triton_name].items()
        }
        variants[t.triton_name] = {
            "model": t.model,
            "precision": t.precision,
            "engine": t.session.__class__.__module__,
            "answer_checks": checks[t.triton_name],
            "paths": paths,
            "ratios": _ratios(paths, windows.concurrencies),
        }
    return {"concurrencies": list(windows.concurrencies), "variants": variants}


def gateway_ceiling(
    target: Target, servers: Servers, windows: ServingWindows, log: Callable
) -> dict[str, Any]:
    """Requests/s at growing concurrency through the gateway (embedded); the highest with p99
    under the limit, and the gateway process's CPU time per request at each step."""
    steps = []
    pid = servers.gateway.pid
    for c in windows.ceiling_concurrencies:
        time.sleep(SETTLE_SECONDS)
        cpu0 = profiling.process_cpu_seconds(pid)
        wall0 = time.perf_counter()
        out = clients.grpc_window(
            servers.targets["gateway"], target.payload, c, windows.ceiling_seconds, windows.warmup
        )
        wall = time.perf_counter() - wall0
        cpu1 = profiling.process_cpu_seconds(pid)
        # the warm-up ran too: scale the CPU to the measured window's share of the wall time
        if cpu0 is not None and cpu1 is not None and out["requests"]:
            share = out["seconds"] / wall
            out["gateway_cpu_ms_per_request"] = round(
                1000 * (cpu1 - cpu0) * share / out["requests"], 4
            )
            out["gateway_cpu_cores_busy"] = round((cpu1 - cpu0) / wall, 3)
        steps.append(out)
        log(f"  ceiling c={c}: {out['rps']} req/s, p99 {out['p99_ms']} ms")
    under = [s for s in steps if s["requests"] and s["p99_ms"] < windows.ceiling_p99_ms]
    best = max(under, key=lambda s: s["rps"], default=None)
    return {
        "variant": target.triton_name,
        "p99_limit_ms": windows.ceiling_p99_ms,
        "steps": steps,
        "best": best,
    }


def gateway_breakdown(
    target: Target, servers: Servers, name: str, windows: ServingWindows, concurrency: int = 1
) -> dict[str, Any]:
    """Where a request's time goes, from a gateway's own histograms around one window."""
    url = servers.procs[name].metrics_url
    before = profiling.scrape_histograms(url, target.model, target.precision)
    out = clients.grpc_window(
        servers.targets[name], target.payload, concurrency, windows.seconds, 0.0
    )
    after = profiling.scrape_histograms(url, target.model, target.precision)
    return {
        "variant": target.triton_name,
        "path": name,
        "concurrency": concurrency,
        "client": out,
        "gateway": profiling.histogram_means(before, after),
    }


def threads_ablation(
    subset: Path,
    repository: Path,
    wanted: tuple[str, str],
    windows: ServingWindows,
    log: Callable,
    threads: tuple[int, ...] = (1, 2),
    rounds: int = 2,
) -> dict[str, Any]:
    """In-process vs gateway at concurrency 1 with 1 and 2 engine threads (interleaved): ONNX
    Runtime's intra-op threads spin after each run, which costs a server idling between requests
    CPU that the client and the gateway's own threads need on a 2-core host."""
    from server.runtime.runner import GatewayProcess

    raw: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        paths = {}
        for t in threads:
            target = load_targets(repository, [wanted], t)[0]
            args = ["--upstream", f"embedded?threads={t}", "--log-level", "ERROR"]
            try:
                gw = stack.enter_context(GatewayProcess(subset, args, timeout=300))
            except Exception as e:
                log(f"  threads ablation: gateway embedded?threads={t} failed: {e}")
                continue
            paths[f"inprocess threads={t}"] = ("inprocess", target, None)
            paths[f"gateway threads={t}"] = ("gateway", target, gw)
        for _ in range(rounds):
            for key, (kind, target, gw) in paths.items():
                time.sleep(SETTLE_SECONDS)
                if kind == "inprocess":
                    out = clients.inprocess_window(
                        target.session, target.feeds, 1, windows.seconds, windows.warmup
                    )
                else:
                    cpu0, wall0 = profiling.process_cpu_seconds(gw.pid), time.perf_counter()
                    out = clients.grpc_window(
                        gw.grpc_url, target.payload, 1, windows.seconds, windows.warmup
                    )
                    wall = time.perf_counter() - wall0
                    cpu1 = profiling.process_cpu_seconds(gw.pid)
                    if cpu0 is not None and cpu1 is not None and out["requests"]:
                        share = out["seconds"] / wall
                        out["gateway_cpu_ms_per_request"] = round(
                            1000 * (cpu1 - cpu0) * share / out["requests"], 4
                        )
                raw.setdefault(key, []).append(out)
    summary = {}
    for key, runs in raw.items():
        summary[key] = {
            "p50_ms": round(median(r["p50_ms"] for r in runs), 4),
            "rps": round(median(r["rps"] for r in runs), 2),
            "gateway_cpu_ms_per_request": round(
                median(r.get("gateway_cpu_ms_per_request", float("nan")) for r in runs), 4
            )
            if key.startswith("gateway")
            else None,
            "rounds": runs,
        }
    log(f"  threads ablation: { {k: v['p50_ms'] for k, v in summary.items()} }")
    return {"variant": f"{wanted[0]}_{wanted[1]}", "concurrency": 1, "results": summary}


def gateway_cprofile(
    subset: Path, target: Target, threads: int, windows: ServingWindows, log: Callable
) -> dict[str, Any]:
    """The gateway's event-loop thread under cProfile (:mod:`lab.floors.profiled_gateway`) during a
    concurrency-1 window, start-up excluded: where its Python time goes per request. cProfile's
    own overhead inflates the figures; compare them with each other."""
    import json
    import os
    import signal
    import sys

    from common import process

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-cprofile-") as tmp:
        prof, ready = Path(tmp) / "gateway.prof", Path(tmp) / "ready.json"
        cmd = [
            sys.executable, "-m", "lab.floors.profiled_gateway", str(prof),
            "--repository", str(subset), "--ports", "0", "--ready-file", str(ready),
            "--upstream", f"embedded?threads={threads}", "--log-level", "ERROR",
        ]  # fmt: skip
        path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        proc = process.start(cmd, env=env)
        try:
            try:
                process.wait_ready(ready.exists, 300, "the gateway under cProfile", proc=proc)
            except process.ProcessError as e:
                return {"error": f"gateway under cProfile did not start ({e})"}
            ports = json.loads(ready.read_text())
            url = f"127.0.0.1:{ports['grpc_port']}"
            clients.grpc_window(url, target.payload, 1, windows.warmup, 0.0)  # warm-up
            metrics = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
            before = profiling.scrape_histograms(metrics, target.model, target.precision)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            out = clients.grpc_window(url, target.payload, 1, windows.seconds, 0.0)
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not prof.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # dump_stats finishing
            after = profiling.scrape_histograms(metrics, target.model, target.precision)
            requests = int(after["request"][1] - before["request"][1])
        finally:
            process.stop(proc, grace=30)
        if not prof.exists():
            return {"error": "the profiled gateway wrote no profile"}
        summary = profiling.cprofile_summary(prof, requests, root=root)
    log(f"  cProfile: {summary['main_thread_us_per_request']} us main-thread time per request")
    return {"variant": target.triton_name, "client_under_profile": out, **summary}
