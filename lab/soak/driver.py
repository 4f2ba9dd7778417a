"""``python -m lab.soak.driver``: hours of mixed traffic against one gateway, and a report of
whether anything stalled, bloated or died (docs/loadtest.md, "Soak"; ``make soak``).

    python -m lab.soak.driver --repository model_repository --minutes 30 --out reports/soak
        [--upstream embedded|triton] [--model digits] ...

Phases, on one gateway started here (``server.runtime.runner.GatewayProcess``, loopback, OS ports):
capacity (closed loop, short) -> paced soak at ``--load`` of it (open loop, every precision,
with malformed / 60 MB / slow / cancelled requests mixed in; with ``--upstream triton`` two
Triton replicas, one killed and restarted midway) -> health and valid-infer latency while one
60 MB request is in flight -> RSS after ``--big-count`` rejected 60 MB requests. RSS and open
fds of the gateway are sampled from /proc all along. Exit 1 when a "Must show" check fails,
2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.model_repository import (
    Manifest,
    RepositoryError,
    load_manifests,
    manifest_path,
    samples_path,
)
from common.process import ProcessError
from lab.soak import payloads as soak_payloads
from lab.soak import probes as soak_probes
from lab.soak import procstat
from lab.soak import report as soak_report
from lab.soak.attacks import Attacks, SlowClients
from lab.soak.traffic import (
    PacedLoad,
    ValidRequest,
    call_once,
    channel,
    measure_capacity,
    model_infer,
)
from loadtest.errors import ConfigError, LoadTestError
from loadtest.inputs import load_inputs
from server.launcher.errors import TritonError
from server.runtime.runner import GatewayProcess

log = logging.getLogger("lab.soak.driver")
PROG = "python -m lab.soak.driver"


@dataclass
class SoakOptions:
    repository: Path
    out: Path
    minutes: float = 30.0
    model: str = "digits"
    upstream: str = "embedded"  # embedded | triton
    # triton: the gateway's front (auto: Envoy unless the replicas' tritonserver crashes on
    # cancelled calls, as nvidia-pytriton's 2.51 does - then the Python front, which detaches)
    front: str = "auto"
    load: float = 0.8  # fraction of the measured capacity
    capacity_s: float = 0.0  # 0: 10 % of the soak, within 5..20 s
    concurrency: int = 8
    attack_fraction: float = 0.05
    cancel_fraction: float = 0.02
    big_interval_s: float = 30.0
    big_count: int = 50
    big_budget_s: float = 300.0
    in_flight_timeout_s: float = 120.0
    slow_clients: int = 4
    warmup_fraction: float = 0.2
    note: str = ""  # a line for the report's header (e.g. what else ran on the host)
    gateway_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ConfigError(f"--minutes must be > 0, got {self.minutes}")
        if self.upstream not in ("embedded", "triton"):
            raise ConfigError(f"--upstream must be embedded or triton, got {self.upstream!r}")
        if self.front not in ("auto", "envoy", "python"):
            raise ConfigError(f"--front must be auto, envoy or python, got {self.front!r}")
        if not 0 < self.load <= 1:
            raise ConfigError(f"--load must be in (0, 1], got {self.load}")
        if not 0 <= self.attack_fraction + self.cancel_fraction < 0.5:
            raise ConfigError("--attack-fraction + --cancel-fraction must be in [0, 0.5)")
        if self.big_count < 1:
            raise ConfigError(f"--big-count must be >= 1, got {self.big_count}")

    @property
    def paced_s(self) -> float:
        return self.minutes * 60.0

    @property
    def capacity_seconds(self) -> float:
        return self.capacity_s or min(20.0, max(5.0, 0.1 * self.paced_s))


# ---- repository -------------------------------------------------------------------------------
def prepare_repository(source: Path, model: str, target: Path) -> Manifest:
    """A repository holding only ``model`` (copied from ``source``; built when it is missing
    there) so the gateway and Triton load nothing else."""
    target.mkdir(parents=True, exist_ok=True)
    if not manifest_path(source, model).is_file():
        log.warning("%s has no %s: building it (cached builds are reused)", source, model)
        from builder.options import BuildOptions
        from builder.pipeline import build_model

        build_model(model, BuildOptions(repository=target, progress=False))
        return load_manifests(target)[model]
    manifest = load_manifests(source)[model]
    for path in (manifest_path(source, model), samples_path(source, model)):
        if path.is_file():
            shutil.copy2(path, target / path.name)
    for record in manifest.variants.values():
        shutil.copytree(source / record.triton_name, target / record.triton_name)
    return load_manifests(target)[model]


def valid_requests(repo: Path, manifest: Manifest, rows: int = 8) -> list[ValidRequest]:
    """One-row requests of real sample rows, precisions interleaved (request i -> i % n)."""
    inputs = load_inputs(repo, manifest.model)
    if inputs is None:
        raise ConfigError(f"no inputs for {manifest.model}: neither samples nor a manifest")
    out_bytes = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in manifest.outputs)
    if len(manifest.outputs) != 1:
        raise ConfigError(
            f"the soak checks one output, {manifest.model} has {len(manifest.outputs)}"
        )
    batches = inputs.batches(1, count=rows)
    return [
        ValidRequest(
            p, soak_payloads.infer_request(manifest.model, b, p).SerializeToString(), out_bytes
        )
        for b in batches
        for p in manifest.variants
    ]


# ---- upstream ---------------------------------------------------------------------------------
@contextlib.contextmanager
def triton_replicas(repo: Path, work: Path, out: Path, count: int = 2) -> Iterator[list[Any]]:
    """``count`` local Triton servers on ``repo`` (OS-picked ports), started in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from server.launcher.tritonserver import TritonOptions, TritonServer

    servers = [
        TritonServer(
            TritonOptions(
                repository=repo,
                grpc_port=0,
                http_port=0,
                metrics_port=0,
                log_file=out / f"triton-{k}.log",
                work_dir=work / f"triton-{k}",
                startup_timeout=180.0,
            )
        )
        for k in range(count)
    ]
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            for started in [pool.submit(s.start) for s in servers]:
                started.result()
        yield servers
    finally:
        for s in servers:
            s.stop()


def kill_and_restart(replicas: list[Any], k: int, at: float, t0: float, record: dict) -> None:
    """At ``t0 + at`` SIGKILL replica ``k`` (server and stubs), then start it again on the same
    ports; times (seconds since ``t0``) go into ``record``."""
    from server.launcher.tritonserver import TritonOptions, TritonServer

    time.sleep(max(0.0, t0 + at - time.monotonic()))
    old = replicas[k]
    record["killed"] = old.grpc_url
    record["killed_at"] = round(time.monotonic() - t0, 3)
    old.kill()
    old.stop()
    opts = TritonOptions(
        repository=old.options.repository,
        grpc_port=old.grpc_port,
        http_port=old.http_port,
        metrics_port=old.metrics_port,
        log_file=old.options.log_file,
        work_dir=old.options.work_dir,
        startup_timeout=180.0,
    )
    try:
        replicas[k] = TritonServer(opts).start()
        record["restarted_at"] = round(time.monotonic() - t0, 3)
    except Exception as e:  # reported: the soak goes on with one replica
        record["restart_error"] = str(e).splitlines()[0]


def triton_successes(url: str, model: str = "") -> int:
    """Triton's own count of successful inferences of ``model`` (every model when empty)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


# ---- phases -----------------------------------------------------------------------------------
def paced_phase(
    opts: SoakOptions,
    gw: GatewayProcess,
    requests: list[ValidRequest],
    rate: float,
    attacks: Attacks,
    replicas: list[Any] | None,
) -> tuple[Any, dict[str, Any], Any]:
    load = PacedLoad(
        gw.grpc_url,
        requests,
        rate,
        attack=attacks.submit,
        attack_fraction=opts.attack_fraction,
        cancel_fraction=opts.cancel_fraction,
    )
    triton: dict[str, Any] = {}
    t0 = time.monotonic()
    attacks.t0 = t0
    killer = None
    if replicas:
        killer = threading.Thread(
            target=kill_and_restart,
            args=(replicas, len(replicas) - 1, opts.paced_s / 2, t0, triton),
            daemon=True,
        )
        killer.start()
    path = f"/v2/models/{opts.model}/infer"
    with attacks, SlowClients(gw.http_url, path, count=opts.slow_clients) as slow:
        result = load.run(opts.paced_s, t0=t0)
    if killer is not None:
        killer.join(300)
        if "restarted_at" in triton:
            try:
                triton["restarted_replica_successes"] = triton_successes(replicas[-1].grpc_url)
            except Exception as e:  # the restarted replica died since: reported, not a crash
                triton["restarted_replica_error"] = str(e).splitlines()[0]
    return result, triton, slow.summary


def gateway_args(opts: SoakOptions, replicas: Sequence[Any] | None) -> list[str]:
    args = ["--log-level", "ERROR", *opts.gateway_args]
    if replicas:
        url = "triton://" + ",".join(r.grpc_url for r in replicas)
        args += ["--upstream", url if opts.front == "auto" else f"{url}?front={opts.front}"]
    return args


def machine() -> dict[str, Any]:
    import platform

    from builder import hostinfo

    info = dict(hostinfo.cpu_info())
    info["hostname"] = platform.node()
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def run_soak(opts: SoakOptions) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="precision-soak-") as tmp:
        repo = Path(tmp) / "repository"
        manifest = prepare_repository(opts.repository, opts.model, repo)
        requests = valid_requests(repo, manifest)
        stack = contextlib.ExitStack()
        with stack:
            replicas = None
            if opts.upstream == "triton":
                replicas = stack.enter_context(triton_replicas(repo, Path(tmp), opts.out))
            gw = stack.enter_context(GatewayProcess(repo, extra_args=gateway_args(opts, replicas)))
            return _phases(opts, gw, manifest, requests, replicas)


def _phases(
    opts: SoakOptions,
    gw: GatewayProcess,
    manifest: Manifest,
    requests: list[ValidRequest],
    replicas: list[Any] | None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "options": opts, "phases": {}}
    first = next(iter(manifest.inputs))
    row_shape = list(first.shape)
    inputs = {first.name: np.zeros((1, *row_shape), np.dtype(first.dtype))}
    malformed = [
        *soak_payloads.malformed_grpc(opts.model, inputs),
        *soak_payloads.malformed_http(opts.model, inputs),
    ]
    big = [
        soak_payloads.big_raw(opts.model, first.name, row_shape),
        soak_payloads.big_typed(opts.model, first.name, row_shape),
        soak_payloads.big_json(opts.model, first.name, row_shape),
    ]
    with procstat.Sampler(gw.pid) as sampler:

        def mark(name: str) -> None:
            report["phases"][name] = round(time.monotonic() - sampler.t0, 2)

        mark("capacity")
        capacity = measure_capacity(gw.grpc_url, requests, opts.capacity_seconds, opts.concurrency)
        if capacity.ok == 0:
            raise LoadTestError(f"capacity phase: no request answered ({capacity.errors} errors)")
        rate = round(opts.load * capacity.requests_per_s, 1)
        report["capacity"], report["rate"] = capacity, rate
        attacks = Attacks(gw.grpc_url, gw.http_url, malformed, big, opts.big_interval_s, 0.0)
        mark("paced")
        paced, triton, slow = paced_phase(opts, gw, requests, rate, attacks, replicas)
        mark("paced_end")
        report.update(triton=triton, slow_clients=slow, cancellations=paced.cancellations)
        report["malformed"] = _outcomes(attacks.malformed)
        report["oversized"] = attacks.big
        mark("in_flight")
        report["in_flight"] = [
            row
            for b in big[1:]
            for row in soak_probes.in_flight(
                attacks, b, gw.grpc_url, gw.http_url, requests[0], opts.in_flight_timeout_s
            )
        ]
        mark("rejected_big")
        report["rejected_big"] = soak_probes.rejected_big(
            attacks, gw.pid, big, opts.big_count, opts.big_budget_s
        )
        mark("end")
        attacks.close()
        report["final_request"] = _final_request(gw.grpc_url, requests[0])
    report["samples"] = sampler.samples
    _figures(report, paced, opts, sampler.samples)
    report["gateway_exit_code"] = gw.stop()
    (opts.out / "gateway.log").write_text(gw.log())
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _final_request(url: str, req: ValidRequest) -> str:
    ch = channel(url)
    try:
        return call_once(model_infer(ch), req, timeout=30) or "ok"
    finally:
        ch.close()


def _outcomes(outcomes: list[Any]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        statuses = by_kind.setdefault(o.kind, {})
        statuses[o.status] = statuses.get(o.status, 0) + 1
    unexpected = sum(not o.expected for o in outcomes)
    return {"sent": len(outcomes), "unexpected": unexpected, "by_kind": by_kind}


def _figures(report: dict[str, Any], paced: Any, opts: SoakOptions, samples: list[Any]) -> None:
    kills = [report["triton"]["killed_at"]] if "killed_at" in report["triton"] else []
    valid = soak_report.summarize_valid(paced.calls, paced.duration_s, kills, paced.skipped)
    start = report["phases"]["paced"]
    warmup = start + max(10.0, opts.warmup_fraction * opts.paced_s)
    grown = soak_report.growth(samples, warmup, report["phases"]["paced_end"])
    report["valid"] = valid
    report["windows"] = soak_report.windows(paced.calls, paced.duration_s)
    report["growth"] = grown
    report["warmup_end"] = warmup
    report["checks"] = soak_report.checks(valid, grown, report["in_flight"], report["rejected_big"])
    report["passed"] = soak_report.passed(report["checks"])


# ---- CLI --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports/soak"), help="report folder")
    p.add_argument("--minutes", type=float, default=30.0, help="length of the paced soak")
    p.add_argument("--model", default="digits", help="logical model (every precision is sent)")
    p.add_argument("--upstream", choices=("embedded", "triton"), default="embedded")
    p.add_argument(
        "--front",
        choices=("auto", "envoy", "python"),
        default="auto",
        help="triton: the gateway's front (the upstream URL's ?front=)",
    )
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    p.add_argument(
        "--capacity-seconds", type=float, default=0.0, help="0: 10 %% of the soak, 5-20 s"
    )
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients for capacity")
    p.add_argument("--attack-fraction", type=float, default=0.05, help="malformed share of slots")
    p.add_argument("--cancel-fraction", type=float, default=0.02, help="cancelled share of slots")
    p.add_argument("--big-interval", type=float, default=30.0, help="s between 60 MB requests")
    p.add_argument("--big-count", type=int, default=50, help="rejected 60 MB requests for RSS")
    p.add_argument("--big-budget", type=float, default=300.0, help="s allowed for --big-count")
    p.add_argument(
        "--in-flight-timeout", type=float, default=120.0, help="deadline of the probed 60 MB one"
    )
    p.add_argument("--slow-clients", type=int, default=4, help="concurrent partial-body clients")
    p.add_argument("--note", default="", help="a line for the report's header")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra gateway option")
    return p


def options_from(args: argparse.Namespace) -> SoakOptions:
    return SoakOptions(
        repository=args.repository,
        out=args.out,
        minutes=args.minutes,
        model=args.model,
        upstream=args.upstream,
        front=args.front,
        load=args.load,
        capacity_s=args.capacity_seconds,
        concurrency=args.concurrency,
        attack_fraction=args.attack_fraction,
        cancel_fraction=args.cancel_fraction,
        big_interval_s=args.big_interval,
        big_count=args.big_count,
        big_budget_s=args.big_budget,
        in_flight_timeout_s=args.in_flight_timeout,
        slow_clients=args.slow_clients,
        gateway_args=list(args.gateway_arg),
        note=args.note,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        opts = options_from(args)
        report = run_soak(opts)
        from lab.soak import markdown as soak_markdown
        from lab.soak import plots as soak_plots

        plots = soak_plots.write_plots(opts.out, report)
        soak_report.write_json(opts.out / "soak.json", report)
        md = soak_markdown.write(opts.out / "soak.md", report, [p.name for p in plots])
    except (LoadTestError, ProcessError, TritonError, RepositoryError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {first}", file=sys.stderr)
        return 2
    verdict = "PASSED" if report["passed"] else "FAILED"
    print(f"soak {verdict}: report {md}")
    for c in report["checks"]:
        print(f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.value} (limit {c.limit})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
