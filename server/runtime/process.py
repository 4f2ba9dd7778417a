"""One ``precision-serve`` process from its arguments: a gateway, the ``--workers`` supervisor, or
one of the supervisor's workers (``python -m server.runtime.process ARGS``: the supervisor's own
options, as :meth:`~server.runtime.options.CommandLine.argv` writes them back)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from common import heap
from server.app import FrontWorker, serve
from server.dataplane.security import TOKEN_ENV
from server.errors import ConfigError, GatewayError
from server.runtime.event_loop import run_loop
from server.runtime.options import CommandLine, parse


def main(argv: list[str], worker: bool = False) -> int:
    """Bad input: one line on stderr and exit 2."""
    try:
        command_line = parse(argv, os.environ.get(TOKEN_ENV))
        logging.basicConfig(
            level=getattr(logging, command_line.process.log_level, logging.WARNING),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if command_line.process.workers != 1 and not worker:
            return _supervise(command_line)
        if command_line.process.front_worker != FrontWorker() and not worker:
            raise ConfigError("front worker: set by the --workers supervisor for its workers only")
        heap.limit_arenas()  # before gRPC's and the engines' threads (common/heap.py)
        run_loop(serve(command_line.serve_options(worker)), command_line.process.loop)
    except GatewayError as e:
        print(f"precision-serve: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _supervise(command_line: CommandLine) -> int:
    from server.runtime.workers import supervise

    return asyncio.run(supervise(command_line))


if __name__ == "__main__":  # a worker started by server/runtime/workers.py
    sys.exit(main(sys.argv[1:], worker=True))
