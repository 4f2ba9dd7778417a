"""``precision-loadtest``: one headless Locust step per (precision, users, batch size), a report.

    precision-loadtest --model digits --precisions fp32,fp16,int8 --users 1,4,16 --duration 30s \
        [--batch-size 1,8] [--target HOST:PORT | --serve] [--warmup 5s] --out reports/NAME
    precision-loadtest --model minilm --precisions policy --schedule ramp:4-16:180 \
        [--user-rate 5] [--objective-ms 100] --out reports/NAME   (users over time, one run each)
    precision-loadtest --model smollm2 [--kind llm] --users 1,2 --max-tokens 64 [--api chat] \
        [--ppl-budget 1.05] --out reports/NAME   (an LLM: streamed OpenAI completions)

Locust is never imported in this process (it gevent-patches the whole interpreter): every step
runs it as a subprocess (see loadtest/runner.py). See docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.errors import ConfigError, LoadTestError
from loadtest.report import RunInfo
from loadtest.runner import Step, StepResult, StepSettings, run_step
from loadtest.schedule import Schedule, parse_schedule

DEFAULT_PRECISIONS = "fp32,fp16,int8"
KINDS = ("auto", "tensor", "llm")
_TIMESPAN = re.compile(r"^\s*(\d+)\s*(s|m|h)?\s*$")


@dataclass
class LoadTestConfig:
    """Everything one load test is told; the CLI only fills this in."""

    model: str
    out: Path
    repository: Path | None = Path("model_repository")
    precisions: list[str] = field(default_factory=lambda: DEFAULT_PRECISIONS.split(","))
    users: list[int] = field(default_factory=lambda: [1, 4, 16])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    duration_s: int = 30
    warmup_s: int = 5
    target: str | None = None  # HOST:PORT of a running gateway; None = start one (--serve)
    metrics_url: str | None = None  # default: the served gateway's, or http://HOST:8002/metrics
    scrape_metrics: bool = True
    accuracy_budget: float = 1.0
    precision_via: str = "parameter"
    gateway_args: list[str] = field(default_factory=list)
    request_timeout_s: float = 10.0
    command: str = ""
    schedule: Schedule | None = None  # users over time instead of --users steps
    user_rate: float = 0.0  # requests/s per user (0: closed loop)
    objective_ms: float | None = None  # drawn on the schedule plots
    bin_s: float = 5.0  # schedule report: seconds per bin
    # "llm" streams OpenAI completions (loadtest/locustfile_llm.py); "tensor" sends ModelInfer;
    # "auto": what the model's manifest declares (its task), tensor without a manifest.
    kind: str = "auto"
    api: str = "completions"  # LLM: which OpenAI API to stream from
    max_tokens: int = 64  # LLM: tokens to generate per request
    prompt: str | None = None  # LLM: None = the locustfile's default paragraph
    ppl_budget: float = 1.05  # LLM: the quality budget, perplexity / fp32's

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.repository is not None:
            self.repository = Path(self.repository)
        if not self.model:
            raise ConfigError("--model must not be empty")
        if not self.precisions:
            raise ConfigError("--precisions must name at least one precision")
        for name, values in (("--users", self.users), ("--batch-size", self.batch_sizes)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"{name} must be positive integers, got {values}")
        if self.duration_s < 1:
            raise ConfigError(f"--duration must be at least 1s, got {self.duration_s}s")
        if self.user_rate < 0 or self.bin_s <= 0:
            raise ConfigError(
                f"--user-rate must be >= 0 and --bin > 0, got {self.user_rate}, {self.bin_s}"
            )
        if self.warmup_s < 0:
            raise ConfigError(f"--warmup must be >= 0s, got {self.warmup_s}s")
        if self.accuracy_budget < 0:
            raise ConfigError(f"--accuracy-budget must be >= 0, got {self.accuracy_budget}")
        self._check_llm_options()
        if self.precision_via not in ("parameter", "variant"):
            raise ConfigError(
                f"--precision-via must be parameter or variant, got {self.precision_via!r}"
            )
        if self.target is not None and ":" not in self.target:
            raise ConfigError(f"--target must be HOST:PORT, got {self.target!r}")
        if self.target is None and (self.repository is None or not self.repository.is_dir()):
            raise ConfigError(f"--serve needs a model repository; {self.repository} is not one")

    def _check_llm_options(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.api not in ("completions", "chat"):
            raise ConfigError(f"--api must be completions or chat, got {self.api!r}")
        if self.max_tokens < 1 or self.ppl_budget < 1:
            raise ConfigError(
                f"--max-tokens must be >= 1 and --ppl-budget >= 1, got {self.max_tokens}, "
                f"{self.ppl_budget}"
            )

    @property
    def steps(self) -> list[Step]:
        return [
            Step(p, u, b) for p in self.precisions for b in self.batch_sizes for u in self.users
        ]


def parse_timespan(text: str, option: str) -> int:
    """'30s', '2m', '1h' or plain seconds -> whole seconds (Locust's --run-time takes these)."""
    m = _TIMESPAN.match(text)
    if not m:
        raise ConfigError(f"{option} must look like 30s, 2m or 1h, got {text!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None


def check_precisions(config: LoadTestConfig) -> None:
    """Fail early, naming the precision, when the manifest has no such variant."""
    if config.repository is None:
        return
    from common.model_repository import load_manifest, manifest_path

    path = manifest_path(config.repository, config.model)
    if not path.is_file():
        if config.target is None:
            raise ConfigError(f"no manifest for model {config.model!r} at {path}")
        return
    built = load_manifest(path).variants
    missing = [p for p in config.precisions if p not in built and p != "policy"]
    if missing:
        raise ConfigError(
            f"model {config.model!r} has no {', '.join(missing)} variant "
            f"(built: {', '.join(built) or 'none'})"
        )


def declared_kind(repository: Path | None, model: str) -> str:
    """``llm`` when the model's manifest declares a decoder LLM (its task), else ``tensor``
    (also without a manifest: then ``--kind llm`` says it)."""
    if repository is None:
        return "tensor"
    from common.model_repository import LLM_TASK, load_manifest, manifest_path

    path = manifest_path(Path(repository), model)
    if not path.is_file():
        return "tensor"
    return "llm" if load_manifest(path).task == LLM_TASK else "tensor"


def resolve_kind(config: LoadTestConfig) -> str:
    return declared_kind(config.repository, config.model) if config.kind == "auto" else config.kind


@dataclass
class LoadTestOutcome:
    results: list[Any]  # StepResult, or LlmStepResult for an LLM
    paths: dict[str, Path]  # report, json, csv and each plot
    info: RunInfo
    llm: Any = None  # loadtest.llm_report.LlmRunInfo for an LLM run

    @property
    def comparison_table(self) -> str:
        if self.llm is not None:
            from loadtest import llm_report

            return llm_report.comparison_table(self.results, self.llm.variants)
        from loadtest.report import comparison_table

        return comparison_table(self.results, self.info)

    @property
    def recommendations(self) -> list[str]:
        if self.llm is not None:
            from loadtest import llm_report

            return llm_report.recommendations(self.results, self.llm.variants, self.llm.ppl_budget)
        from loadtest.report import recommendations

        return recommendations(self.results, self.info)


def run_loadtest(config: LoadTestConfig, log: Callable[[str], None] = print) -> LoadTestOutcome:
    """Run every step (starting a gateway when no target is given) and write the report."""
    if config.schedule is not None:
        from loadtest.scheduled import run_scheduled

        if resolve_kind(config) == "llm":
            raise ConfigError("--schedule is for tensor models; an LLM takes --users steps")
        check_precisions(config)
        return run_scheduled(config, log)  # type: ignore[return-value]
    if resolve_kind(config) == "llm":
        return run_llm_loadtest(config, log)
    from builder.hostinfo import cpu_info
    from loadtest.inputs import load_inputs
    from loadtest.report import variant_info, write_report

    check_precisions(config)
    variants, meaningful = variant_info(config.repository, config.model)
    found = load_inputs(config.repository, config.model) if config.repository else None
    info = RunInfo(
        model=config.model,
        target=config.target or "",
        host=dict(cpu_info()),
        command=config.command,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        accuracy_budget=config.accuracy_budget,
        variants=variants,
        accuracy_meaningful=meaningful,
        inputs=found.origin if found else "synthetic (server metadata)",
    )
    config.out.mkdir(parents=True, exist_ok=True)
    results: list[StepResult] = []
    with ExitStack() as stack:
        settings = _step_settings(config, info, stack, log, http=False)
        steps = config.steps
        for i, step in enumerate(steps, 1):
            started = time.perf_counter()
            r = run_step(step, settings)
            results.append(r)
            log(
                f"[{i}/{len(steps)}] {config.model}/{step.precision} users={step.users} "
                f"batch={step.batch_size}: {r.requests} requests, {r.failures} failed, "
                f"{r.throughput:.0f} inf/s, p50 {r.latency_ms['p50']:.2f} ms "
                f"({time.perf_counter() - started:.0f}s)"
            )
    paths = write_report(config.out, results, info)
    return LoadTestOutcome(results, paths, info)


def _step_settings(
    config: LoadTestConfig,
    info: RunInfo,
    stack: ExitStack,
    log: Callable[[str], None],
    http: bool,
) -> StepSettings:
    """The steps' settings against ``--target``, or against a gateway started here (kept open by
    ``stack``); ``http``: the steps speak HTTP (an LLM's OpenAI API), else gRPC."""
    target, metrics_url = config.target, config.metrics_url
    if target is None:
        from server.runtime.runner import GatewayProcess

        log(f"starting a gateway on {config.repository} ...")
        gw = stack.enter_context(GatewayProcess(config.repository, config.gateway_args))  # type: ignore[arg-type]
        target = gw.http_url if http else gw.grpc_url
        metrics_url = metrics_url or gw.metrics_url
        info.target = f"{target} (gateway started by precision-loadtest)"
    elif metrics_url is None:
        metrics_url = f"http://{target.rsplit(':', 1)[0]}:8002/metrics"
    return StepSettings(
        model=config.model,
        target=target,
        repository=config.repository,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        precision_via=config.precision_via,
        metrics_url=metrics_url if config.scrape_metrics else None,
        request_timeout_s=config.request_timeout_s,
        work_dir=config.out / "steps",
    )


def run_llm_loadtest(config: LoadTestConfig, log: Callable[[str], None] = print) -> LoadTestOutcome:
    """An LLM's steps: Locust streaming OpenAI completions through the gateway's HTTP port."""
    from builder.hostinfo import cpu_info
    from loadtest.llm_report import LlmRunInfo, llm_variant_info, write_llm_report
    from loadtest.llm_runner import LlmSettings, LlmStepResult, run_llm_step

    check_precisions(config)
    variants, quality_source = llm_variant_info(config.repository, config.model)
    info = RunInfo(
        model=config.model,
        target=config.target or "",
        host=dict(cpu_info()),
        command=config.command,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        accuracy_budget=config.accuracy_budget,
        inputs="the prompt of --prompt" if config.prompt else "the locustfile's default prompt",
    )
    llm = LlmSettings(api=config.api, max_tokens=config.max_tokens, prompt=config.prompt)
    config.out.mkdir(parents=True, exist_ok=True)
    results: list[LlmStepResult] = []
    with ExitStack() as stack:
        settings = _step_settings(config, info, stack, log, http=True)
        steps = [Step(p, u, 1) for p in config.precisions for u in config.users]
        for i, step in enumerate(steps, 1):
            started = time.perf_counter()
            r = run_llm_step(step, settings, llm)
            results.append(r)
            log(
                f"[{i}/{len(steps)}] {config.model}/{step.precision} users={step.users}: "
                f"{r.requests} requests, {r.failures} failed, {r.tokens_per_s:.1f} tokens/s, "
                f"TTFT p50 {r.ttft_ms['p50'] or float('nan'):.0f} ms, "
                f"ITL p50 {r.itl_ms['p50'] or float('nan'):.1f} ms "
                f"({time.perf_counter() - started:.0f}s)"
            )
    run = LlmRunInfo(info, variants, quality_source, config.api, config.max_tokens,
                     config.ppl_budget)  # fmt: skip
    paths = write_llm_report(config.out, results, run)
    return LoadTestOutcome(results, paths, info, llm=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precision-loadtest",
        description="Load-test a model's precision variants through the gateway with Locust.",
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", required=True, help="logical model name, e.g. digits")
    p.add_argument(
        "--precisions",
        help=f"comma-separated (default {DEFAULT_PRECISIONS}; an LLM: every built variant)",
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="llm: stream OpenAI completions over HTTP; tensor: Triton ModelInfer over gRPC; "
        "auto (default): what the model's manifest declares",
    )
    p.add_argument("--users", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--duration", default="30s", help="measured time per step (30s, 2m)")
    p.add_argument("--warmup", default="5s", help="warm-up per step, not counted (0 = none)")
    p.add_argument("--batch-size", default="1", help="rows per request, comma-separated")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--target", help="HOST:PORT of a running gateway's gRPC endpoint (an LLM: its HTTP one)"
    )
    where.add_argument("--serve", action="store_true", help="start a gateway (the default)")
    p.add_argument(
        "--metrics-url", help="gateway /metrics (default: the served one, or HOST:8002 of --target)"
    )
    p.add_argument("--no-metrics", action="store_true", help="skip the server-side view")
    p.add_argument(
        "--accuracy-budget", type=float, default=1.0, help="points of accuracy vs fp32 (1.0)"
    )
    p.add_argument(
        "--precision-via",
        choices=["parameter", "variant"],
        default="parameter",
        help="ask via the request parameter (default) or by the variant's name",
    )
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra argument for the started gateway (repeat), e.g. "
        "--gateway-arg=--upstream=embedded?threads=2",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        help="seconds per request (default 10; an LLM: seconds the stream may stay silent, 60)",
    )
    p.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="an LLM: the OpenAI API to stream from")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="an LLM: tokens per request (64)")
    p.add_argument(
        "--prompt", help="an LLM: the prompt (default: English prose ending mid-sentence)"
    )
    p.add_argument("--ppl-budget", type=float, default=1.05,
                   help="an LLM: quality budget, perplexity / fp32's (1.05)")  # fmt: skip
    p.add_argument(
        "--schedule",
        help="users over time instead of --users steps: 0:4,60:8,120:4 or ramp:4-16:180 "
        "(chain ramps with commas); precision 'policy' lets the gateway's policy choose",
    )
    p.add_argument("--user-rate", type=float, default=0.0, help="requests/s per user (0: closed)")
    p.add_argument("--objective-ms", type=float, help="p99 objective drawn on schedule plots")
    p.add_argument("--bin", type=float, default=5.0, help="seconds per schedule report bin")
    p.add_argument("--out", type=Path, help="output folder (default reports/<model>-<time>)")
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> LoadTestConfig:
    out = args.out or Path("reports") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    kind = declared_kind(args.repository, args.model) if args.kind == "auto" else args.kind
    precisions = args.precisions
    if precisions is None:
        precisions = llm_precisions(args.repository, args.model) if kind == "llm" else None
    timeout = args.request_timeout
    if timeout is None:
        timeout = 60.0 if kind == "llm" else 10.0
    return LoadTestConfig(
        model=args.model,
        out=out,
        repository=args.repository,
        precisions=[x.strip() for x in (precisions or DEFAULT_PRECISIONS).split(",") if x.strip()],
        users=_int_list(args.users, "--users"),
        batch_sizes=_int_list(args.batch_size, "--batch-size"),
        duration_s=parse_timespan(args.duration, "--duration"),
        warmup_s=parse_timespan(args.warmup, "--warmup"),
        target=args.target,
        metrics_url=args.metrics_url,
        scrape_metrics=not args.no_metrics,
        accuracy_budget=args.accuracy_budget,
        precision_via=args.precision_via,
        gateway_args=list(args.gateway_arg),
        request_timeout_s=timeout,
        command=shlex.join(["precision-loadtest", *argv]),
        schedule=parse_schedule(args.schedule) if args.schedule else None,
        user_rate=args.user_rate,
        objective_ms=args.objective_ms,
        bin_s=args.bin,
        kind=kind,
        api=args.api,
        max_tokens=args.max_tokens,
        prompt=args.prompt,
        ppl_budget=args.ppl_budget,
    )


LLM_DEFAULT_PRECISIONS = "fp32,int8,int4"


def llm_precisions(repository: Path | None, model: str) -> str:
    """Every variant the LLM's manifest lists (fp32,int8,int4 without one)."""
    if repository is None:
        return LLM_DEFAULT_PRECISIONS
    from common.model_repository import load_manifest, manifest_path

    path = manifest_path(Path(repository), model)
    if not path.is_file():
        return LLM_DEFAULT_PRECISIONS
    return ",".join(load_manifest(path).variants) or LLM_DEFAULT_PRECISIONS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, argv)
        outcome = run_loadtest(config)
    except LoadTestError as e:
        print(f"precision-loadtest: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the gateway failing to start, a report that cannot be written
        print(f"precision-loadtest: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(outcome.comparison_table)
    print(*(f"- {line}" for line in outcome.recommendations), sep="\n")
    print(f"report: {outcome.paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
