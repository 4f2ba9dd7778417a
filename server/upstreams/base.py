"""The upstream protocol: what actually runs a variant (embedded ONNX Runtime, or Triton).

An upstream is chosen with ``--upstream``: ``embedded``, ``triton://HOST:PORT[,HOST:PORT...]`` or
``triton+dns://NAME:PORT`` (replicas = NAME's addresses, re-resolved), each optionally followed by
``?KEY=VALUE&...``: the settings that belong to that upstream (``embedded?threads=1``,
``triton://h:8001?cancel=propagate&timeout_s=5``). The scheme picks a registry entry (name ->
"module:attribute", imported lazily); the class is constructed as ``cls(address, repository,
settings)`` where ``address`` is the text between ``scheme://`` and ``?`` ("" for ``embedded``)
and ``settings`` the :class:`UpstreamSettings` its query made (:class:`UpstreamQuery`, declared
by the upstream's package: server/upstreams/embedded/settings.py,
server/upstreams/triton/settings.py).

Contract for implementations:
- ``start()`` loads/connects (may take time; runs before the gateway reports ready) and must not
  raise for one broken variant: that variant just reports ``ready() == False``.
- ``ready(variant)`` is cheap and synchronous (called per request by the fallback logic).
- ``infer(variant, inputs, deadline)`` gets validated numpy inputs (batch dimension first) and
  returns every output of the variant by name, batch dimension first. ``deadline`` is an
  absolute ``time.monotonic()`` value or None. It raises :class:`UpstreamUnavailable` when the
  variant cannot serve right now (not loaded, Triton answered UNAVAILABLE, connection refused):
  the core then falls back to the next variant in the model's chain. Other ``GatewayError``s
  (DeadlineExceeded, InvalidInput, InternalError) go to the client as they are.
- It never blocks the event loop (run engines in threads; use grpc.aio for remote calls).
- ``report_ready(...)`` keeps the ``precision_serve_upstream_ready`` gauge current;
  ``problem(variant)`` says why an unready variant is unready (the repository index shows it).
- What an upstream does beyond that it declares in ``capabilities`` (:class:`Capabilities`); the
  core reads the declaration and never probes for methods:
  - ``records_timing``: the upstream observes ``precision_serve_queue_duration_seconds`` /
    ``upstream_duration_seconds`` / ``batch_size`` itself (the embedded one does); otherwise the
    core observes the duration of each call as ``precision_serve_upstream_duration_seconds``.
  - ``honours_deadline``: ``infer`` / ``forward`` end by ``deadline`` (raising DeadlineExceeded);
    the core then awaits them directly, otherwise it wraps the call in ``asyncio.wait_for``.
  - ``forward`` (pass-through): ``async forward(variant, payload, deadline)`` takes the client's
    serialised ModelInferRequest and returns the serialised reply (the gRPC path then skips
    decoding and validation; errors are the upstream's own). Same fallback rules.
  - ``generate`` (decoder LLM variants, ``Variant.kind == "llm"``): ``async generate(variant,
    request)`` returns a :class:`server.upstreams.generation.Generation` (see there); raises
    UpstreamUnavailable as ``infer`` does, ``Unavailable`` when the variant's queue is full,
    ``InvalidGeneration`` for a request the model cannot take (prompt over its context).
  - ``model_control`` (``--model-control explicit``, server/dataplane/model_control.py):
    ``async load(variant)`` / ``async unload(variant)`` make the variant ready / unready
    (loading one that is loaded is a no-op); without it load/unload answer UNIMPLEMENTED.
  :class:`UpstreamBase` gives the optional methods for an upstream that declares none of them.
- ``close()`` releases sessions/channels; called once at shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.plugins import PluginRegistry
from server.catalog import Repository, Variant
from server.errors import ConfigError, Unavailable, Unsupported
from server.upstreams.generation import Generation, GenerationRequest


class UpstreamUnavailable(Unavailable):
    """The variant cannot serve right now; the core tries the next one in the fallback chain."""


@dataclass(frozen=True)
class UpstreamSettings:
    """Knobs shared by upstreams, set by the keys of an ``--upstream`` URL's query
    (:class:`UpstreamQuery`). ``threads`` = intra-op threads per engine session (0 = auto)."""

    threads: int = 0
    # Embedded: threads that load variants at start-up (0 = 2); each instance then has its own.
    max_workers: int = 0
    # Remote upstreams: default per-call timeout when the client gave no deadline.
    default_timeout_s: float = 30.0
    # triton+dns: seconds between resolutions of the name (``?interval=``).
    resolve_interval_s: float = 5.0
    # Triton: cancel a call when its client cancels or its deadline passes (False: let it run to its
    # end, server/upstreams/triton/detach.py - tritonserver < 2.53 can crash on cancellations).
    cancel_upstream: bool = False
    # Embedded LLM variants (server/upstreams/embedded/llm.py): sequences generating at once
    # per variant, requests waiting for one beyond them, the largest max_tokens a request may ask
    llm_sequences: int = 2
    llm_queue: int = 16
    llm_max_tokens: int = 2048
    # Triton: what listens on the public ports - "envoy" (Envoy forwards inference to Triton, the
    # gateway is the control plane behind it on loopback, server/front/) or "python" (the
    # gateway itself; ``?front=python``); "auto": Envoy unless a replica runs a tritonserver that
    # crashes on cancelled calls while cancellations are detached (server/app.py
    # ``choose_front``)
    front: str = "auto"
    # Triton: the replicas' HTTP port (``?http=PORT``), for Envoy to send HTTP inference straight
    # to them; 0: HTTP inference goes through the control plane
    http_port: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What an upstream declares it does beyond running variants (see the module docstring)."""

    records_timing: bool = False
    honours_deadline: bool = False
    forward: bool = False
    model_control: bool = False
    generate: bool = False
    # it answers ModelStatistics for its variants itself (``replica_statistics``: Triton's own
    # entries), which a front that bypasses the gateway (the Envoy front) needs
    statistics: bool = False


@runtime_checkable
class Upstream(Protocol):
    name: str  # label value for precision_serve_upstream_ready{upstream=...}
    capabilities: Capabilities

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self, variant: Variant) -> bool: ...

    def problem(self, variant: Variant) -> str: ...

    async def infer(
        self, variant: Variant, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]: ...

    async def forward(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes: ...

    async def load(self, variant: Variant) -> None: ...

    async def unload(self, variant: Variant) -> None: ...

    async def generate(self, variant: Variant, request: GenerationRequest) -> Generation: ...

    async def replica_statistics(self) -> list[Any]: ...

    async def server_versions(self) -> dict[str, str]: ...


class UpstreamBase:
    """The optional parts of :class:`Upstream` for an upstream that declares none of them: the
    core never calls them unless ``capabilities`` says so; a direct call is refused."""

    name = "upstream"
    capabilities = Capabilities()

    def problem(self, variant: Variant) -> str:
        return ""

    async def forward(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes:
        raise Unsupported(f"upstream {self.name!r} does not forward requests")

    async def load(self, variant: Variant) -> None:
        raise Unsupported(f"upstream {self.name!r} cannot load models")

    async def unload(self, variant: Variant) -> None:
        raise Unsupported(f"upstream {self.name!r} cannot unload models")

    async def generate(self, variant: Variant, request: GenerationRequest) -> Generation:
        raise Unsupported(f"upstream {self.name!r} does not serve generative (LLM) models")

    async def replica_statistics(self) -> list[Any]:
        raise Unsupported(f"upstream {self.name!r} keeps no statistics of its own")

    async def server_versions(self) -> dict[str, str]:
        """The version of the inference server behind each reachable replica (none here)."""
        return {}


@dataclass(frozen=True)
class QueryKey:
    """One ``?KEY=VALUE`` of an upstream URL: the :class:`UpstreamSettings` field it sets."""

    field: str
    parse: Callable[[str], Any]  # raises ValueError (its message names what is wrong)
    help: str
    format: Callable[[Any], str] = str  # a field value as the key's VALUE (the documented default)


@dataclass(frozen=True)
class UpstreamQuery:
    """The query keys an upstream takes (none for a plug-in that declares no query), and the
    keys it no longer takes: ``removed`` maps each to why (its error says so)."""

    keys: Mapping[str, QueryKey]
    removed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def apply(self, spec: str, query: str, settings: UpstreamSettings) -> UpstreamSettings:
        changes: dict[str, Any] = {}
        known = ", ".join(self.keys) or "none"
        for item in filter(None, query.split("&")):
            key, eq, value = item.partition("=")
            if key in self.removed:
                why = self.removed[key]
                raise ConfigError(f"upstream {spec!r}: setting {key!r} was removed: {why}")
            if key not in self.keys:
                raise ConfigError(f"upstream {spec!r}: unknown setting {key!r} (known: {known})")
            if not eq:
                raise ConfigError(f"upstream {spec!r}: {key} needs a value ({key}=...)")
            entry = self.keys[key]
            if entry.field in changes:
                raise ConfigError(f"upstream {spec!r}: {key} given twice")
            try:
                changes[entry.field] = entry.parse(value)
            except ValueError as e:
                raise ConfigError(f"upstream {spec!r}: {key}={value!r}: {e}") from None
        return dataclasses.replace(settings, **changes)

    def defaults(self) -> dict[str, str]:
        """key -> its default VALUE (from :class:`UpstreamSettings`)."""
        base = UpstreamSettings()
        return {key: k.format(getattr(base, k.field)) for key, k in self.keys.items()}


def count(text: str) -> int:
    """A whole number >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def seconds(text: str, minimum: float = 0.0, inclusive: bool = True) -> float:
    value = float(text)
    ok = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and ok):
        raise ValueError(f"must be {'>=' if inclusive else '>'} {minimum:g}")
    return value


NO_QUERY = UpstreamQuery({})

# scheme -> "module:attribute"
_UPSTREAMS = PluginRegistry(
    "upstream",
    ConfigError,
    {
        "embedded": "server.upstreams.embedded.upstream:EmbeddedUpstream",
        "triton": "server.upstreams.triton.upstream:TritonUpstream",
        "triton+dns": "server.upstreams.triton.dns:DnsTritonUpstream",
    },
)


# scheme -> "module:attribute" of its UpstreamQuery
_QUERIES = PluginRegistry(
    "upstream",
    ConfigError,
    {
        "embedded": "server.upstreams.embedded.settings:QUERY",
        "triton": "server.upstreams.triton.settings:QUERY",
        "triton+dns": "server.upstreams.triton.settings:DNS_QUERY",
    },
)


def register_upstream(scheme: str, target: str, query: str | None = None) -> None:
    """``query``: "module:attribute" of the scheme's :class:`UpstreamQuery` (None: no keys)."""
    _UPSTREAMS.register(scheme, target)
    if query is not None:
        _QUERIES.register(scheme, query)


def upstream_query(scheme: str) -> UpstreamQuery:
    return _QUERIES.load(scheme) if scheme in _QUERIES else NO_QUERY


def upstream_schemes() -> list[str]:
    return sorted(_UPSTREAMS.names())


def parse_upstream_spec(spec: str) -> tuple[str, str]:
    """``"embedded"`` -> ("embedded", ""); ``"triton://h:1,h:2?timeout_s=5"`` -> ("triton",
    "h:1,h:2") (the query: :func:`parse_upstream`)."""
    scheme, sep, address = spec.partition("?")[0].partition("://")
    scheme = scheme.strip().lower()
    if scheme not in _UPSTREAMS:
        raise ConfigError(
            f"unknown upstream {spec!r}; use one of: "
            + ", ".join(f"{s}://..." if s != "embedded" else s for s in upstream_schemes())
        )
    if scheme != "embedded" and not (sep and address):
        raise ConfigError(f"upstream {spec!r} needs an address: {scheme}://HOST:PORT[,HOST:PORT]")
    return scheme, address


def parse_upstream(
    spec: str, settings: UpstreamSettings | None = None
) -> tuple[str, str, UpstreamSettings]:
    """(scheme, address, ``settings`` changed by the spec's ``?KEY=VALUE&...``); ConfigError
    naming the bad key or value."""
    scheme, address = parse_upstream_spec(spec)
    query = spec.partition("?")[2]
    return (
        scheme,
        address,
        upstream_query(scheme).apply(spec, query, settings or UpstreamSettings()),
    )


def create_upstream(
    spec: str, repository: Repository, settings: UpstreamSettings | None = None
) -> Upstream:
    scheme, address, settings = parse_upstream(spec, settings)
    return _UPSTREAMS.load(scheme)(address, repository, settings)


def report_ready(upstream: str, variant: Variant, ready: bool) -> None:
    """Publish a variant's readiness on precision_serve_upstream_ready{upstream, model}."""
    from server import metrics

    metrics.UPSTREAM_READY.labels(upstream=upstream, model=variant.name).set(1 if ready else 0)


def forget_ready(upstream: str, variant: Variant) -> None:
    """Drop a replica's ``precision_serve_upstream_ready`` series (it left discovery)."""
    from server import metrics

    with contextlib.suppress(KeyError):
        metrics.UPSTREAM_READY.remove(upstream, variant.name)
