"""``make demo``: build the demo models' variants and print their summary tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.errors import BuildError

DEMO_MODELS = ("digits", "minilm", "resnet50")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m builder.demo")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default=",".join(DEMO_MODELS))
    args = p.parse_args(argv)
    from builder.pipeline import BuildOptions, build_model
    from builder.report import summary

    for name in args.models.split(","):
        try:
            manifest = build_model(name, BuildOptions(repository=args.repository))
        except BuildError as e:
            print(f"demo: error building {name}: {e}", file=sys.stderr)
            return 2
        print(summary(manifest), end="\n\n", flush=True)
    print(f"repository: {args.repository.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
