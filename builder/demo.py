"""``make demo``: the whole loop on the embedded default.

Build the demo models' variants, start the gateway, run a short load test across the
precisions, print the comparison tables and where the reports and plots are, stop the gateway.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from builder.errors import BuildError

DEMO_MODELS = ("digits", "minilm", "resnet50")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m builder.demo")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default=",".join(DEMO_MODELS), help="demo models to build")
    p.add_argument(
        "--loadtest-models", default="digits,minilm", help="models to load-test (short steps)"
    )
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--no-loadtest", action="store_true", help="build and print tables only")
    args = p.parse_args(argv)
    from builder.pipeline import BuildOptions, build_model
    from builder.report import summary

    started = time.monotonic()
    models = [m for m in args.models.split(",") if m]
    for name in models:
        print(f"== building {name} (variants are kept if already built) ==", flush=True)
        try:
            manifest = build_model(name, BuildOptions(repository=args.repository))
        except BuildError as e:
            print(f"demo: error building {name}: {e}", file=sys.stderr)
            return 2
        print(summary(manifest), end="\n\n", flush=True)
    print(f"repository: {args.repository.resolve()}", flush=True)
    if not args.no_loadtest:
        from loadtest.demo import run_demo
        from loadtest.errors import LoadTestError

        targets = [m for m in args.loadtest_models.split(",") if m in models]
        try:
            run_demo(args.repository, targets, args.out)
        except LoadTestError as e:
            print(f"demo: load test failed: {e}", file=sys.stderr)
            return 2
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
