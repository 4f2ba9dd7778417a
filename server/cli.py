"""``precision-serve``: run the gateway (see docs/gateway.md).

``precision-serve triton ...`` is handed to server/launcher/cli.py (a local Triton server).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from server.app import DEFAULT_DRAIN_S, DEFAULT_MAX_REQUEST_BYTES, ServeOptions, serve
from server.dataplane.restricted import GROUPS, parse_groups
from server.errors import ConfigError, GatewayError
from server.runtime.event_loop import LOOPS, run_loop
from server.transports.http.app import DEFAULT_BODY_TIMEOUT_S, HttpLimits
from server.transports.http.limits import DEFAULT_MAX_CONNECTIONS
from server.transports.request_bounds import LIMIT_MODES
from server.upstreams.base import DEFAULT_MERGE_LIMIT
from server.upstreams.triton.detach import MODES as DETACH_MODES

TOKEN_ENV = "PRECISION_SERVE_AUTH_TOKEN"


def _calls(text: str) -> int | None:
    """``--grpc-max-concurrent-rpcs``: a number of calls, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precision-serve",
        description="Triton-compatible gRPC/HTTP gateway that routes each request by precision.",
    )
    p.add_argument("--repository", type=Path, required=True, help="model repository directory")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = OS picks)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0 = OS picks)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus port (0 = OS picks)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--upstream",
        default="embedded",
        help="embedded (ONNX Runtime in-process), triton://HOST:PORT[,HOST:PORT...] or "
        "triton+dns://NAME:PORT[?interval=S] (replicas re-resolved every S s)",
    )
    p.add_argument("--routing", type=Path, help="routing YAML file (policies per model)")
    p.add_argument("--ready-file", type=Path, help="write bound ports as JSON here once ready")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest accepted request (RESOURCE_EXHAUSTED / 413 above)",
    )
    p.add_argument(
        "--message-limit",
        choices=LIMIT_MODES,
        default="models",
        help="models: gRPC refuses messages larger than the models' largest valid request "
        "(when every input is bounded; at most --max-request-bytes) before they reach Python; "
        "max-request-bytes: always --max-request-bytes",
    )
    p.add_argument(
        "--grpc-max-concurrent-rpcs",
        type=_calls,
        default=None,
        help="gRPC calls handled at once; more get RESOURCE_EXHAUSTED (0 = no limit; default "
        "auto: as many as 8 GiB of messages at the gRPC message limit, 128..4096)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve gRPC and HTTP over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument(
        "--auth-token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token required on inference calls (env {TOKEN_ENV}); visible in ps: "
        "prefer --auth-token-file",
    )
    p.add_argument("--auth-token-file", type=Path, help="read the bearer token from this file")
    p.add_argument(
        "--restricted-api",
        default="",
        help=f"comma-separated API groups that need the token too ({', '.join(GROUPS)})",
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per session (0=auto)")
    p.add_argument(
        "--triton-cancellation",
        choices=DETACH_MODES,
        default="detach",
        help="detach: a Triton call runs to its end when its client cancels or its deadline "
        "passes (tritonserver < 2.53 can crash on cancelled calls); propagate: cancel it",
    )
    p.add_argument(
        "--triton-merge",
        type=int,
        default=DEFAULT_MERGE_LIMIT,
        metavar="N",
        help="Triton pass-through: with N forwarded calls per variant and replica in flight, "
        "later requests wait and go merged into one call (default %(default)s; 0: never merge)",
    )
    p.add_argument(
        "--triton-merge-wait",
        type=float,
        default=0.0,
        metavar="MS",
        help="Triton pass-through: once a call ends, the requests waiting to merge wait MS "
        "milliseconds more for others to join them (default 0: they go at once; uvloop's "
        "timers count whole milliseconds)",
    )
    p.add_argument(
        "--retime",
        choices=("auto", "always", "never"),
        default="auto",
        help="re-time the variants on this host before auto ranks them: auto (when this host "
        "differs from the manifest's build host), always, never",
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain on SIGTERM")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_S,
        help="on SIGTERM, seconds of 'not ready' with the listeners still open before closing",
    )
    p.add_argument(
        "--http-body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a client has to send an HTTP request body (408 after), and the headers "
        "of its first request (closed after)",
    )
    p.add_argument(
        "--http-max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open HTTP connections per process; more are answered 503 and closed (0 = no cap)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the gRPC/HTTP ports (SO_REUSEPORT), one /metrics view",
    )
    p.add_argument(
        "--model-control",
        choices=("none", "explicit"),
        default="none",
        help="explicit: load/unload variants through Triton's repository API; none (default): "
        "refused, as Triton's NONE mode",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto), or the standard asyncio loop",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["triton"]:  # ``precision-serve triton start|derive``: server/launcher/cli.py
        from server.launcher.cli import main as triton_main

        return triton_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.auth_token = auth_token(args)
        if args.workers != 1:
            return _supervise(args)
        options = ServeOptions(
            repository=args.repository,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            upstream=args.upstream,
            routing=args.routing,
            ready_file=args.ready_file,
            max_request_bytes=args.max_request_bytes,
            message_limit=args.message_limit,
            cancel_upstream=args.triton_cancellation == "propagate",
            triton_merge=args.triton_merge,
            triton_merge_wait_ms=args.triton_merge_wait,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            auth_token=args.auth_token or None,
            threads=args.threads,
            retime=args.retime,
            grace_s=args.grace,
            grpc_max_concurrent_rpcs=args.grpc_max_concurrent_rpcs,
            drain_s=args.drain_seconds,
            http=HttpLimits(args.http_body_timeout, args.http_max_connections),
            restricted_api=parse_groups(args.restricted_api, args.auth_token),
            worker=args.worker,
            model_control=args.model_control,
        )
        run_loop(serve(options), args.loop)
    except GatewayError as e:
        print(f"precision-serve: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def auth_token(args: argparse.Namespace) -> str | None:
    """``--auth-token-file`` (read once, stripped), else ``--auth-token`` / the environment."""
    if args.auth_token_file is None:
        return args.auth_token or None
    try:
        token = Path(args.auth_token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --auth-token-file {args.auth_token_file}: {e}") from e
    if not token:
        raise ConfigError(f"--auth-token-file {args.auth_token_file} is empty")
    return token


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: server/runtime/workers.py starts N workers with these arguments."""
    from server.runtime.workers import WorkerOptions, supervise

    if args.model_control != "none":  # each worker would load/unload on its own
        raise ConfigError("--model-control explicit needs --workers 1")
    worker_args = ["--repository", str(args.repository), "--upstream", args.upstream]
    worker_args += ["--max-request-bytes", str(args.max_request_bytes)]
    worker_args += ["--message-limit", args.message_limit]
    worker_args += ["--triton-cancellation", args.triton_cancellation]
    worker_args += ["--triton-merge", str(args.triton_merge)]
    worker_args += ["--triton-merge-wait", str(args.triton_merge_wait)]
    worker_args += ["--threads", str(args.threads), "--log-level", args.log_level]
    worker_args += ["--loop", args.loop, "--retime", args.retime]
    if args.grpc_max_concurrent_rpcs is not None:
        worker_args += ["--grpc-max-concurrent-rpcs", str(args.grpc_max_concurrent_rpcs)]
    worker_args += ["--drain-seconds", str(args.drain_seconds)]
    worker_args += ["--http-body-timeout", str(args.http_body_timeout)]
    worker_args += ["--http-max-connections", str(args.http_max_connections)]
    if args.restricted_api:
        parse_groups(args.restricted_api, args.auth_token)  # fail here, not in every worker
        worker_args += ["--restricted-api", args.restricted_api]
    if args.routing:
        worker_args += ["--routing", str(args.routing)]
    if args.tls_cert or args.tls_key:
        worker_args += ["--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key)]
    if args.auth_token:  # through the environment, not the command line others can read
        os.environ[TOKEN_ENV] = args.auth_token
    options = WorkerOptions(
        workers=args.workers,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        worker_args=worker_args,
        ready_file=args.ready_file,
        grace_s=args.grace,
        drain_s=args.drain_seconds,
    )
    return asyncio.run(supervise(options))


if __name__ == "__main__":
    sys.exit(main())
