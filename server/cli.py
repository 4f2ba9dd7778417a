"""``precision-serve``: run the gateway (see docs/gateway.md; options: docs/options.md).

``precision-serve triton ...`` is handed to server/launcher/cli.py (a local Triton server).
The options are declared by the packages that own them and composed in
server/runtime/options.py; server/runtime/process.py runs the gateway (or ``--workers`` of them).
"""

from __future__ import annotations

import sys

from server.runtime.options import build_parser
from server.runtime.process import main as serve_main

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["triton"]:  # ``precision-serve triton start|derive``: server/launcher/cli.py
        from server.launcher.cli import main as triton_main

        return triton_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
