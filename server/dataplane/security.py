"""The data plane's options (``security``): the bearer token, the API groups it guards, and
whether the repository API may load and unload variants.

The token is never an option (anyone who can run ``ps`` would read it): it comes from
``--auth-token-file`` or the ``PRECISION_SERVE_AUTH_TOKEN`` environment variable (read by the
command line, server/cli.py; the file wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.options import option
from server.dataplane.model_control import MODES as MODEL_CONTROL_MODES
from server.dataplane.restricted import GROUPS, parse_groups
from server.errors import ConfigError

TOKEN_ENV = "PRECISION_SERVE_AUTH_TOKEN"


def _groups(value: frozenset[str]) -> str:
    return ",".join(sorted(value))


@dataclass
class SecurityOptions:
    """Who may call what: the bearer token (from ``--auth-token-file`` or the environment
    variable ``PRECISION_SERVE_AUTH_TOKEN``), the API groups it guards besides inference, and the
    repository API."""

    group: ClassVar[str] = "security"

    auth_token_file: Path | None = option(
        None,
        parse=Path,
        metavar="PATH",
        help=f"read the bearer token required on inference calls from this file (stripped; "
        f"else the environment variable {TOKEN_ENV})",
    )
    restricted_api: frozenset[str] = option(
        frozenset(),
        parse=parse_groups,
        format=_groups,
        metavar="GROUP,...",
        help=f"API groups that need the token too ({', '.join(GROUPS)})",
    )
    model_control: str = option(
        "none",
        choices=MODEL_CONTROL_MODES,
        help="explicit: load/unload variants through Triton's repository API; none: refused, as "
        "Triton's NONE mode",
    )
    # the token itself: read from ``auth_token_file`` when given, else as passed (the CLI passes
    # the environment variable's value)
    auth_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"--model-control must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                f"got {self.model_control!r}"
            )
        if self.auth_token_file is not None:
            self.auth_token = read_token(self.auth_token_file)
        self.auth_token = self.auth_token or None
        if self.restricted_api and not self.auth_token:
            raise ConfigError(f"--restricted-api needs a token (--auth-token-file or {TOKEN_ENV})")


def read_token(path: Path) -> str:
    """The token in ``path`` (read once, stripped); ConfigError when unreadable or empty."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --auth-token-file {path}: {e}") from e
    if not token:
        raise ConfigError(f"--auth-token-file {path} is empty")
    return token
