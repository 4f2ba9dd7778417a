"""``make demo``: build the demo models, then a short load test across each one's precisions.

    from loadtest.demo import run_demo
    run_demo(Path("model_repository"), ["digits"], Path("reports/demo"))

or ``python -m loadtest.demo`` (what ``make demo`` runs): build the demo models, then load-test
them; ``--no-build`` load-tests what is already built.
One gateway (embedded upstream) serves the whole repository; each model gets users 1 and 4 at
batch 1, 5 s per step after a 1 s warm-up, and its own report folder under ``out``. An LLM
(its manifest's task says so) gets a short streaming load test instead (:func:`run_llm_demo`:
one user, 10 s per precision after a 2 s warm-up, 32 tokens per request).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.cli import LoadTestConfig, LoadTestOutcome, declared_kind, run_loadtest
from loadtest.errors import LoadTestError

DEMO_USERS = [1, 4]
DEMO_DURATION_S = 5
DEMO_WARMUP_S = 1
LLM_DEMO_USERS = [1]
LLM_DEMO_DURATION_S = 10
LLM_DEMO_WARMUP_S = 2
LLM_DEMO_MAX_TOKENS = 32


def _precisions(repository: Path, model: str) -> list[str]:
    from common.model_repository import load_manifest, manifest_path

    return list(load_manifest(manifest_path(repository, model)).variants)


def run_demo(
    repository: Path,
    models: Sequence[str],
    out: Path,
    *,
    users: Sequence[int] = DEMO_USERS,
    duration_s: int = DEMO_DURATION_S,
    warmup_s: int = DEMO_WARMUP_S,
    log: Callable[[str], None] = print,
) -> dict[str, LoadTestOutcome]:
    """Start a gateway, load-test every built precision of each model, print each comparison
    table and where the report and plots are; stop the gateway. Returns the outcomes by model."""
    from server.runtime.runner import GatewayProcess

    repository, out = Path(repository), Path(out)
    outcomes: dict[str, LoadTestOutcome] = {}
    log(f"loadtest: starting a gateway on {repository} ...")
    with GatewayProcess(repository) as gw:
        for model in models:
            if declared_kind(repository, model) == "llm":
                outcomes[model] = run_llm_demo(gw, repository, model, out, log)
                continue
            config = LoadTestConfig(
                model=model,
                out=out / model,
                repository=repository,
                precisions=_precisions(repository, model),
                users=list(users),
                duration_s=duration_s,
                warmup_s=warmup_s,
                target=gw.grpc_url,
                metrics_url=gw.metrics_url,
                command=f"loadtest.demo.run_demo({str(repository)!r}, [{model!r}], {str(out)!r})",
            )
            outcome = run_loadtest(config, log=log)
            outcomes[model] = outcome
            log("")
            log(f"{model}: load test through the gateway ({', '.join(config.precisions)})")
            log(outcome.comparison_table)
            log("\n".join(f"- {line}" for line in outcome.recommendations))
            plots = [p for k, p in outcome.paths.items() if p.suffix == ".png"]
            log(f"report: {outcome.paths['report']}")
            log(f"plots:  {', '.join(str(p) for p in plots)}")
    return outcomes


def run_llm_demo(
    gw: Any, repository: Path, model: str, out: Path, log: Callable[[str], None] = print
) -> LoadTestOutcome:
    """A short streaming load test of every built precision of an LLM through ``gw``'s OpenAI
    API (one user, :data:`LLM_DEMO_DURATION_S` s per precision); prints the ranked table."""
    precisions = _precisions(repository, model)
    config = LoadTestConfig(
        model=model,
        out=out / model,
        repository=repository,
        precisions=precisions,
        users=list(LLM_DEMO_USERS),
        duration_s=LLM_DEMO_DURATION_S,
        warmup_s=LLM_DEMO_WARMUP_S,
        target=gw.http_url,
        metrics_url=gw.metrics_url,
        request_timeout_s=60.0,
        kind="llm",
        max_tokens=LLM_DEMO_MAX_TOKENS,
        command=f"loadtest.demo.run_llm_demo(gw, {str(repository)!r}, {model!r}, {str(out)!r})",
    )
    outcome = run_loadtest(config, log=log)
    log("")
    log(f"{model}: streaming load test through the gateway's OpenAI API ({', '.join(precisions)})")
    log(outcome.comparison_table)
    log("\n".join(f"- {line}" for line in outcome.recommendations))
    log(f"report: {outcome.paths['report']}")
    return outcome


DEMO_MODELS = ("digits", "minilm", "resnet50", "smollm2")  # smollm2: the LLM table (docs/llm.md)


def build_demo_models(repository: Path, models: Sequence[str], log: Callable[[str], None]) -> None:
    """Build every precision variant of each demo model (variants already built are kept)."""
    from builder.errors import USER_ERRORS
    from builder.pipeline import BuildOptions, build_model
    from builder.report import summary

    for name in models:
        log(f"== building {name} (variants are kept if already built) ==")
        try:
            manifest = build_model(name, BuildOptions(repository=repository))
        except USER_ERRORS as e:
            raise LoadTestError(f"building {name}: {e}") from e
        log(summary(manifest) + "\n")
    log(f"repository: {repository.resolve()}")


def main(argv: list[str] | None = None) -> int:
    """``make demo``: build the demo models, then load-test them through one gateway."""
    p = argparse.ArgumentParser(prog="python -m loadtest.demo")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default=",".join(DEMO_MODELS), help="demo models to build")
    p.add_argument(
        "--loadtest-models",
        default="digits,minilm,smollm2",
        help="models to load-test (short steps; an LLM streams)",
    )
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--duration", type=int, default=DEMO_DURATION_S, help="seconds per step")
    p.add_argument("--no-build", action="store_true", help="load-test what is already built")
    p.add_argument("--no-loadtest", action="store_true", help="build and print tables only")
    args = p.parse_args(argv)
    started = time.monotonic()
    models = [m for m in args.models.split(",") if m]
    targets = [m for m in args.loadtest_models.split(",") if m and (args.no_build or m in models)]

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        if not args.no_build:
            build_demo_models(args.repository, models, log)
        if not args.no_loadtest:
            run_demo(args.repository, targets, args.out, duration_s=args.duration, log=log)
    except LoadTestError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
