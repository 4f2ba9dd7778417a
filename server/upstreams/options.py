"""The upstream option: ``--upstream URL``, with the upstream's own settings in its query."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from common.options import option
from server.upstreams.base import UpstreamSettings, parse_upstream, upstream_query, upstream_schemes


@dataclass
class UpstreamOptions:
    """What runs the variants: ``embedded`` (ONNX Runtime in this process),
    ``triton://HOST:PORT[,HOST:PORT...]`` (Triton replicas) or ``triton+dns://NAME:PORT`` (the
    replicas are NAME's A/AAAA addresses, re-resolved; a Kubernetes headless Service). Settings
    that belong to the upstream follow as a URL query, ``?KEY=VALUE&...`` (keys below); a
    routing file's pools take the same URLs."""

    group: ClassVar[str] = "upstream"

    spec: str = option(
        "embedded",
        name="upstream",
        metavar="URL",
        help="embedded[?threads=N], triton://HOST:PORT[,HOST:PORT...][?KEY=VALUE&...] or "
        "triton+dns://NAME:PORT[?KEY=VALUE&...] (keys: docs/options.md)",
    )

    # from ``spec`` (checked here, so a bad key is a one-line error at start)
    scheme: str = field(init=False, default="")
    address: str = field(init=False, default="")
    settings: UpstreamSettings = field(init=False, default=UpstreamSettings())

    def __post_init__(self) -> None:
        self.scheme, self.address, self.settings = parse_upstream(self.spec)

    @staticmethod
    def reference() -> str:
        """The query keys of each upstream, with their defaults (docs/options.md)."""
        lines = ["| upstream | key | default | meaning |", "|---|---|---|---|"]
        for scheme in upstream_schemes():
            query = upstream_query(scheme)
            defaults = query.defaults()
            for key, entry in query.keys.items():
                lines.append(f"| `{scheme}` | `{key}` | `{defaults[key]}` | {entry.help} |")
        return "\n".join(lines)
