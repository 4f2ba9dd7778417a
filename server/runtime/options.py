"""The process options (``process``) and the whole command line, composed from every group.

Each group is declared once, by the package that owns it (common/options.py turns the dataclasses
into argparse groups, argument lists and docs/options.md). :class:`CommandLine` holds one instance
of each; ``precision-serve`` (server/cli.py) and the ``--workers`` supervisor's workers
(server/runtime/process.py) parse the same :func:`build_parser`, and the supervisor hands its
options to the workers as :meth:`CommandLine.argv` - no second list of options anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from common.options import add_group, from_namespace, markdown, option, to_argv
from server.app import FrontWorker, ServeOptions, Shutdown
from server.dataplane.security import SecurityOptions
from server.errors import ConfigError
from server.routing.options import RoutingOptions
from server.runtime.event_loop import LOOPS
from server.transports.options import LimitsOptions, ListenOptions
from server.upstreams.options import UpstreamOptions

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class ProcessOptions:
    """The gateway process(es): how many, their event loop and log level, the ready file, and
    how they stop on SIGTERM/SIGINT."""

    group: ClassVar[str] = "process"

    workers: int = option(
        1,
        parse=int,
        metavar="N",
        help="gateway processes sharing the gRPC/HTTP ports (SO_REUSEPORT), one /metrics view",
    )
    loop: str = option(
        "auto",
        choices=LOOPS,
        help="event loop: uvloop when installed (auto), uvloop, or the standard asyncio loop",
    )
    log_level: str = option(
        "WARNING", parse=str.upper, choices=LOG_LEVELS, help="log level (any case)"
    )
    ready_file: Path | None = option(
        None,
        parse=Path,
        metavar="PATH",
        help="write the bound ports (and pid) as JSON here once ready",
    )
    shutdown: Shutdown = option(
        default_factory=Shutdown,
        parse=Shutdown.parse,
        metavar="drain=S,grace=S",
        help="on SIGTERM: S seconds of 'not ready' with the listeners still open (load balancers "
        "move away), then S seconds for requests in flight to finish; a key left out keeps its "
        "default",
    )
    # internal: the --workers supervisor tells each worker its part in the Envoy front
    # (server/runtime/workers.py); not in --help nor docs/options.md
    front_worker: FrontWorker = option(
        default_factory=FrontWorker,
        parse=FrontWorker.parse,
        metavar="first=GRPC:HTTP,...|peer",
        help="this worker's part in the Envoy front: the first (the others' control ports) or a "
        "peer behind its Envoy",
        hidden=True,
    )

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")


# ``--help`` order: where it listens, what a client may cost, who may call, what runs the
# variants, what is served and how it is routed, the processes
GROUPS: tuple[type[Any], ...] = (
    ListenOptions,
    LimitsOptions,
    SecurityOptions,
    UpstreamOptions,
    RoutingOptions,
    ProcessOptions,
)


@dataclass
class CommandLine:
    """One instance of every group: what ``precision-serve ARGS`` asked for."""

    listen: ListenOptions
    limits: LimitsOptions
    security: SecurityOptions
    upstream: UpstreamOptions
    routing: RoutingOptions
    process: ProcessOptions = field(default_factory=ProcessOptions)

    def groups(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def argv(self, **changes: Any) -> list[str]:
        """The arguments that parse back to these options; ``changes`` replace fields of the
        process group (``ready_file=...``) or the listen group (``ports=...``)."""
        argv: list[str] = []
        for group in self.groups():
            own = {k: v for k, v in changes.items() if hasattr(group, k)}
            argv += to_argv(dataclasses.replace(group, **own) if own else group)
        return argv

    def serve_options(self, worker: bool = False) -> ServeOptions:
        return ServeOptions(
            routing=self.routing,
            listen=self.listen,
            limits=self.limits,
            security=self.security,
            upstream=self.upstream,
            ready_file=self.process.ready_file,
            shutdown=self.process.shutdown,
            worker=worker,
            front_worker=self.process.front_worker,
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, as every other bad input
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="precision-serve",
        allow_abbrev=False,  # a removed option must not live on as an abbreviation
        description="Triton-compatible gRPC/HTTP gateway that routes each request by precision "
        "(docs/options.md). `precision-serve triton start|derive ...`: a local Triton server.",
    )
    for cls in GROUPS:
        add_group(p, cls)
    return p


def parse(argv: list[str], token: str | None = None) -> CommandLine:
    """``argv`` -> every group (ConfigError: a bad value; argparse exits 2 on a bad option).
    ``token``: the bearer token when no ``--auth-token-file`` is given (the environment)."""
    namespace = build_parser().parse_args(argv)
    groups = {}
    for cls in GROUPS:
        extra = {"auth_token": token} if cls is SecurityOptions else {}
        groups[cls.group] = from_namespace(cls, namespace, **extra)
    return CommandLine(**groups)


def reference() -> str:
    """docs/options.md: generated from the groups (tests/server/test_options.py checks it)."""
    intro = (
        "Generated by `python -m server.runtime.options > docs/options.md` from the option groups "
        "in the code "
        "(server/runtime/options.py lists them); `tests/server/test_options.py` fails when this "
        "page and the code differ. Bad input prints one line (`precision-serve: error: ...`) "
        "and exits 2."
    )
    return markdown(GROUPS, "precision-serve options", intro)


if __name__ == "__main__":  # python -m server.runtime.options > docs/options.md
    sys.stdout.write(reference())
