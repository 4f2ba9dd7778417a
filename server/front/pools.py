"""Precision pools through the Envoy front: which replicas each variant's clusters hold.

With ``pools`` in the routing file (server/upstreams/pools.py) each variant goes to its
precision's pool, the others to ``--upstream``. :func:`plan_pools` reads those upstream URLs
(each pool's settings come from its own URL's query) and says, per variant, which Triton
replicas Envoy sends it to (:class:`~server.front.config.Replicas`: the pool's addresses or
name, ``?http=``, ``?interval=``, ``?timeout_s=``), and which variants stay with the control
plane because a non-Triton upstream serves them (an embedded pool). One front listens for every
pool, so the Triton URLs must agree on ``front`` and, for HTTP inference in Envoy, all give
``?http=`` or none do: anything else is refused in one line (ConfigError).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.errors import ConfigError
from server.front.config import Replicas, triton_endpoints
from server.upstreams.base import parse_upstream

TRITON_SCHEMES = ("triton", "triton+dns")
UPSTREAM = "--upstream"  # the name the default upstream goes by in messages


@dataclass(frozen=True)
class PoolPlan:
    """``front``: "auto", "envoy", "python" or "" (no Triton upstream at all); ``replicas``:
    variant -> its Triton replicas; ``elsewhere``: variants another upstream serves (the control
    plane)."""

    front: str
    replicas: dict[str, Replicas]
    elsewhere: frozenset[str]


def _triton(spec: str) -> tuple[Replicas, str] | None:
    """A Triton URL's replicas and front; None for another upstream (embedded)."""
    scheme, address, settings = parse_upstream(spec)
    if scheme not in TRITON_SCHEMES:
        return None
    replicas = Replicas(
        triton_endpoints(address),
        dns=scheme == "triton+dns",
        resolve_interval_s=settings.resolve_interval_s,
        http_port=settings.http_port,
        timeout_s=settings.default_timeout_s,
    )
    return replicas, settings.front


def _names(members: Iterable[str]) -> str:
    return ", ".join(sorted(members))


def plan_pools(
    default_spec: str | None,
    pools: Mapping[str, str],
    assignment: Mapping[str, str],
    variants: Iterable[str],
) -> PoolPlan:
    """``pools``: pool name -> upstream URL; ``assignment``: variant -> pool name (the rest go
    to ``default_spec``, the ``--upstream``); ``variants``: every variant's name."""
    front = pools_front(default_spec, pools)
    triton: dict[str, Replicas] = {}
    for name, spec in _specs(default_spec, pools).items():
        found = _triton(spec)
        if found is not None:
            triton[name] = found[0]
    replicas: dict[str, Replicas] = {}
    elsewhere: set[str] = set()
    used: set[str] = set()
    for variant in variants:
        member = assignment.get(variant, UPSTREAM)
        if member not in triton:  # embedded (or no --upstream: the control plane says why)
            elsewhere.add(variant)
            continue
        replicas[variant] = triton[member]
        used.add(member)
    with_http = {n for n in used if triton[n].http_port}
    if with_http and with_http != used:
        raise ConfigError(
            "precision pools: Envoy sends HTTP inference to Triton only when every Triton pool "
            f"gives its HTTP port (?http= on {_names(with_http)}, not on "
            f"{_names(used - with_http)}): give it to all of them or to none"
        )
    return PoolPlan(front, replicas, frozenset(elsewhere))


def _specs(default_spec: str | None, pools: Mapping[str, str]) -> dict[str, str]:
    return {**pools, **({UPSTREAM: default_spec} if default_spec is not None else {})}


def pools_front(default_spec: str | None, pools: Mapping[str, str]) -> str:
    """The ``?front=`` the Triton URLs of ``pools`` and ``--upstream`` agree on ("" when none is
    a Triton URL); ConfigError when they differ (one front listens for every pool)."""
    fronts: dict[str, set[str]] = {}
    for name, spec in _specs(default_spec, pools).items():
        found = _triton(spec)
        if found is not None:
            fronts.setdefault(found[1], set()).add(name)
    if len(fronts) > 1:
        raise ConfigError(
            "precision pools: one front listens for every pool, but the Triton URLs name "
            + "; ".join(f"front={f} ({_names(n)})" for f, n in sorted(fronts.items()))
            + ": give them all the same ?front="
        )
    return next(iter(fronts), "")
