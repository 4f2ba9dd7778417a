"""The routing options: what is served (the model repository) and how requests are routed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common.options import option
from server.routing.retime import RETIME_MODES, check_mode


@dataclass
class RoutingOptions:
    """What is served and how each request picks its variant (docs/gateway.md, "Routing")."""

    group: ClassVar[str] = "routing"

    repository: Path = option(parse=Path, metavar="DIR", help="model repository directory")
    routing: Path | None = option(
        None, parse=Path, metavar="FILE", help="routing YAML file (policies per model, pools)"
    )
    retime: str = option(
        "auto",
        choices=RETIME_MODES,
        help="re-time the variants on this host before auto ranks them: auto (when this host "
        "differs from the manifest's build host), always, never",
    )

    def __post_init__(self) -> None:
        check_mode(self.retime)
