"""``precision-serve triton ...``: run a local Triton server on a precision-serve repository.

    precision-serve triton start --repository model_repository [--grpc-port 8001] [--http-port 8000]
        [--metrics-port 8002] [--host 127.0.0.1] [--model-control none|explicit] [--log-file PATH]
        [--work-dir DIR] [--threads 1] [--startup-timeout 120] [--ready-file PATH]
    precision-serve triton derive --repository model_repository --output DIR [--threads 1]

``server.cli`` dispatches ``precision-serve triton ...`` here: ``add_parser(subparsers)`` adds the
``triton`` sub-command to its parser (``args.func(args)`` runs it), and ``main(argv)`` parses the
arguments after ``triton`` on its own (``python -m server.launcher`` uses it too). Errors print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.model_repository import RepositoryError, atomic_write_text
from server.launcher.errors import TritonError

PROG = "precision-serve triton"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="triton_command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="start tritonserver on a repository (foreground)")
    start.add_argument("--repository", type=Path, required=True, help="model repository")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    start.add_argument("--grpc-port", type=_port, default=8001, help="0: picked by the OS")
    start.add_argument("--http-port", type=_port, default=8000, help="0: picked by the OS")
    start.add_argument("--metrics-port", type=_port, default=8002, help="0: picked by the OS")
    start.add_argument(
        "--model-control",
        choices=("none", "explicit"),
        default="none",
        help="explicit: models can be loaded/unloaded through Triton's repository API",
    )
    start.add_argument("--log-file", type=Path, help="tritonserver's log (default: in work dir)")
    start.add_argument("--work-dir", type=Path, help="where the derived repository goes")
    start.add_argument("--threads", type=int, default=1, help="engine threads per instance")
    start.add_argument("--startup-timeout", type=float, default=120.0, help="seconds")
    start.add_argument("--ready-file", type=Path, help="write the ports as JSON once ready")
    start.set_defaults(func=_start)

    derive = sub.add_parser("derive", help="write the python-backend repository only")
    derive.add_argument("--repository", type=Path, required=True, help="model repository")
    derive.add_argument("--output", type=Path, required=True, help="target folder (replaced)")
    derive.add_argument("--threads", type=int, default=1, help="engine threads per instance")
    derive.set_defaults(func=_derive)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``triton`` to a parent CLI's ``add_subparsers()``; run it with ``args.func(args)``."""
    parser = subparsers.add_parser("triton", help="run a local Triton server on the repository")
    _configure(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a local Triton server on a precision-serve repository."
    )
    _configure(parser)
    return parser


def _derive(args: argparse.Namespace) -> int:
    from server.launcher.derive import derive_repository

    models = derive_repository(args.repository, args.output, args.threads)
    print(f"derived {len(models)} python-backend models into {args.output}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from server.launcher.tritonserver import TritonOptions, TritonServer

    try:
        options = TritonOptions(
            repository=args.repository,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            model_control=args.model_control,
            log_file=args.log_file,
            work_dir=args.work_dir,
            threads=args.threads,
            startup_timeout=args.startup_timeout,
        )
    except ValueError as e:
        raise TritonError(str(e)) from e
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(options)
    server.start()
    try:
        print(
            f"tritonserver ready in {server.startup_seconds:.1f}s: grpc {server.grpc_url} "
            f"http {server.http_url} metrics {server.metrics_url} "
            f"({len(server.models)} models, log {server.log_file})",
            flush=True,
        )
        if args.ready_file:
            ready = {
                "grpc_port": server.grpc_port,
                "http_port": server.http_port,
                "metrics_port": server.metrics_port,
                "pid": os.getpid(),
                "tritonserver_pid": server.pid,
                "log_file": str(server.log_file),
            }
            atomic_write_text(args.ready_file, json.dumps(ready) + "\n")
        while not stop.wait(0.5):
            if not server.running:
                raise TritonError(f"tritonserver exited unexpectedly; see {server.log_file}")
    finally:
        server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments; errors become one line on stderr and exit code 2."""
    try:
        return int(args.func(args))
    except (TritonError, RepositoryError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {first}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
