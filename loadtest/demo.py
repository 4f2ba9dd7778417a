"""The load-test part of ``make demo``: a short run across the precisions of each demo model.

    from loadtest.demo import run_demo
    run_demo(Path("model_repository"), ["digits"], Path("reports/demo"))

or ``python -m loadtest.demo --repository model_repository --models digits --out reports/demo``.
One gateway (embedded upstream) serves the whole repository; each model gets users 1 and 4 at
batch 1, 5 s per step after a 1 s warm-up, and its own report folder under ``out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loadtest.cli import LoadTestConfig, LoadTestOutcome, run_loadtest
from loadtest.errors import LoadTestError

DEMO_USERS = [1, 4]
DEMO_DURATION_S = 5
DEMO_WARMUP_S = 1


def _precisions(repository: Path, model: str) -> list[str]:
    from builder.manifest import load_manifest, manifest_path

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
    from server.testing import GatewayProcess

    repository, out = Path(repository), Path(out)
    outcomes: dict[str, LoadTestOutcome] = {}
    log(f"loadtest: starting a gateway on {repository} ...")
    with GatewayProcess(repository) as gw:
        for model in models:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.demo")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default="digits", help="comma-separated logical models")
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--duration", type=int, default=DEMO_DURATION_S, help="seconds per step")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    try:
        run_demo(args.repository, models, args.out, duration_s=args.duration)
    except LoadTestError as e:
        print(f"loadtest demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
