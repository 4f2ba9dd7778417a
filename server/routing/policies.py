"""Per-request precision routing: policies (protocol + lazy registry), routing file, fallback.

For a request to a logical model the precision comes from, in order: the request parameter
``precision``, the gRPC metadata / HTTP header ``x-precision``, then the model's policy. A request
for a variant name (``digits_int8``) bypasses routing entirely. See docs/gateway.md.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.plugins import PluginRegistry
from server.catalog import PRECISION_ORDER, Model, Repository
from server.errors import ConfigError, ModelNotFound
from server.routing.evidence import quality_is_evidence
from server.routing.slo_config import SloFile, SloSettings

log = logging.getLogger(__name__)

# Least to most accurate: a request whose variant is unready moves right along this chain.
DEFAULT_FALLBACK = ["int8", "int8-dynamic", "fp16", "bf16", "fp32"]
DEFAULT_SHADOW_FRACTION = 0.1
# ``auto`` budget when the routing file gives none: accuracy points (0..100) for labelled
# models, 1 - cosine for models whose manifest says accuracy is not meaningful.
# The manifest's accuracy_loss is always in points (0..100): accuracy points lost where labels
# exist, else 100 x (1 - top-1 agreement) for classifiers and 100 x (1 - mean cosine) for
# embeddings (builder/evaluate.py). One budget unit for every model.
DEFAULT_BUDGET_POINTS = 1.0


# ---- the routing file (pydantic only for parsing) ------------------------------------------
class _ShadowFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = "fp32"
    fraction: float = Field(DEFAULT_SHADOW_FRACTION, ge=0.0, le=1.0)


class _ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: str | None = None
    precision: str | None = None
    weights: dict[str, float] | None = None
    accuracy_budget: float | None = Field(None, ge=0.0)
    accept_synthetic_quality: bool | None = None  # auto/slo: route on figures from noise
    shadow: _ShadowFile | None = None
    fallback: list[str] | None = None
    precision_pools: dict[str, str] | None = None  # precision -> pool name
    slo: SloFile | None = None  # the ``slo`` policy's objective (server/routing/slo.py)


class _RoutingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    seed: int | None = None
    pools: dict[str, str] = Field(default_factory=dict)  # pool name -> upstream spec
    defaults: _ModelFile = Field(default_factory=_ModelFile)
    models: dict[str, _ModelFile] = Field(default_factory=dict)


@dataclass
class ModelRoute:
    """The routing settings of one model, defaults applied."""

    policy: str = "fixed"
    precision: str | None = None  # fixed: the precision; shadow: the served one
    weights: dict[str, float] = field(default_factory=dict)
    accuracy_budget: float | None = None
    # auto/slo route on quality figures measured on synthetic data only when this is set
    # (server/routing/evidence.py); otherwise they serve the reference precision and say why.
    accept_synthetic_quality: bool = False
    shadow_reference: str = "fp32"
    shadow_fraction: float = DEFAULT_SHADOW_FRACTION
    fallback: list[str] = field(default_factory=lambda: list(DEFAULT_FALLBACK))
    # precision -> pool name (``pools`` of the routing file); unlisted: the ``--upstream``
    precision_pools: dict[str, str] = field(default_factory=dict)
    slo: SloSettings | None = None


@dataclass
class RoutingConfig:
    models: dict[str, ModelRoute] = field(default_factory=dict)
    default: ModelRoute = field(default_factory=ModelRoute)
    seed: int | None = None
    pools: dict[str, str] = field(default_factory=dict)  # pool name -> upstream spec

    def pool_assignment(self, repository: Repository) -> dict[str, str]:
        """Variant name -> pool name, for every variant whose precision is given a pool."""
        out: dict[str, str] = {}
        for name, model in repository.models.items():
            pools = self.for_model(name).precision_pools
            for precision, variant in model.variants.items():
                if precision in pools:
                    out[variant.name] = pools[precision]
        return out

    def for_model(self, name: str) -> ModelRoute:
        return self.models.get(name, self.default)


def _merge(defaults: _ModelFile, own: _ModelFile) -> ModelRoute:
    def pick(attr: str) -> Any:
        value = getattr(own, attr)
        return value if value is not None else getattr(defaults, attr)

    shadow = pick("shadow") or _ShadowFile()
    return ModelRoute(
        policy=pick("policy") or "fixed",
        precision=pick("precision"),
        weights=dict(pick("weights") or {}),
        accuracy_budget=pick("accuracy_budget"),
        accept_synthetic_quality=bool(pick("accept_synthetic_quality")),
        shadow_reference=shadow.reference,
        shadow_fraction=shadow.fraction,
        fallback=list(pick("fallback") or DEFAULT_FALLBACK),
        precision_pools={
            p.strip().lower(): pool for p, pool in (pick("precision_pools") or {}).items()
        },
        slo=SloSettings.from_file(pick("slo")) if pick("slo") else None,
    )


def parse_routing(data: Any, source: str = "routing file") -> RoutingConfig:
    try:
        parsed = _RoutingFile.model_validate(data or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {where}: {err['msg']}") from e
    config = RoutingConfig(
        models={name: _merge(parsed.defaults, m) for name, m in parsed.models.items()},
        default=_merge(parsed.defaults, _ModelFile()),
        seed=parsed.seed,
        pools=dict(parsed.pools),
    )
    for name, route in [("defaults", config.default), *config.models.items()]:
        unknown = sorted(set(route.precision_pools.values()) - set(config.pools))
        if unknown:
            raise ConfigError(
                f"{source}: {name}: precision_pools names unknown pool(s) {', '.join(unknown)} "
                f"(pools: {', '.join(sorted(config.pools)) or 'none'})"
            )
    return config


def load_routing(path: Path | None) -> RoutingConfig:
    if path is None:
        return RoutingConfig()
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read routing file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"routing file {path} is not valid YAML: {e}") from e
    return parse_routing(data, str(path))


# ---- policies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    precision: str
    policy: str  # label for precision_serve_routing_decisions_total (policy name/request/header)
    shadow_reference: str | None = None  # set when this request is mirrored


@dataclass(frozen=True)
class RouteContext:
    key: str | None  # x-request-key (sticky split)
    rng: random.Random


class Policy(Protocol):
    """Built once per model as ``cls(model, route)``; raises ConfigError when misconfigured.

    A policy that adapts to load declares ``learns = True`` and gets ``observe(precision,
    seconds, counts)`` each time a request it routed ends (``counts``: the time is a real serving
    time - ok or deadline exceeded - not a fast rejection). See server/routing/slo.py.
    ``reason`` is a note for the repository index (e.g. why ``auto`` serves the reference).
    """

    name: str
    default_precision: str  # what the logical model's ModelConfig describes
    reason: str
    learns: bool

    def choose(self, ctx: RouteContext) -> Decision: ...

    def observe(self, precision: str, seconds: float, counts: bool) -> None: ...


class PolicyBase:
    """What a policy that neither learns nor explains anything declares."""

    reason = ""
    learns = False

    def observe(self, precision: str, seconds: float, counts: bool) -> None:
        """Nothing to learn (the core calls this only when ``learns``)."""


def _check_precision(model: Model, precision: str, what: str) -> str:
    if precision not in model.variants:
        raise ConfigError(
            f"routing for model {model.name!r}: {what} {precision!r} is not built "
            f"(available: {', '.join(model.precisions())})"
        )
    return precision


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) for a request key (same key -> same split bucket)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class FixedPolicy(PolicyBase):
    name = "fixed"

    def __init__(self, model: Model, route: ModelRoute) -> None:
        self.precision = _check_precision(
            model, route.precision or model.precisions()[0], "precision"
        )
        self.default_precision = self.precision

    def choose(self, ctx: RouteContext) -> Decision:
        return Decision(self.precision, self.name)


class AutoPolicy(PolicyBase):
    """Fastest variant (manifest ``speed``) whose ``details.accuracy_loss`` is within budget.

    A variant the builder marked over its accuracy budget (``details.budget_met`` false, kept
    by ``--keep-over-budget``) never qualifies, whatever its recorded loss. Variants without a
    recorded loss only qualify when they are fp32 (the reference). Variants
    without speed data rank after those with it; ties go to the more accurate precision.
    Decided once at start-up from the manifest (speeds re-timed on this host where it differs
    from the build host, server/routing/retime.py). Quality figures measured on synthetic data are
    not routed on unless the route accepts them (server/routing/evidence.py): then the reference
    precision is served and ``reason`` says why.
    """

    name = "auto"

    def __init__(self, model: Model, route: ModelRoute) -> None:
        budget = route.accuracy_budget
        if budget is None:
            budget = DEFAULT_BUDGET_POINTS
        self.budget = budget
        evidence, self.reason = quality_is_evidence(model, route)
        if not evidence:
            log.warning("routing: %s", self.reason)
            self.precision = self.default_precision = model.precisions()[0]
            return
        candidates = []
        for precision, variant in model.variants.items():
            loss = variant.record.details.get("accuracy_loss")
            if variant.record.details.get("budget_met") is False:
                continue
            if loss is None and precision != "fp32":
                continue
            if loss is not None and float(loss) > budget:
                continue
            candidates.append(
                (self._speed_rank(variant.record.speed), _accuracy_rank(precision), precision)
            )
        if not candidates:
            raise ConfigError(
                f"routing for model {model.name!r}: no variant within accuracy budget {budget}"
            )
        self.precision = self.default_precision = min(candidates)[2]

    @staticmethod
    def _speed_rank(speed: dict[str, float]) -> tuple[int, float]:
        if speed.get("latency_ms_p50"):
            return (0, float(speed["latency_ms_p50"]))
        if speed.get("throughput"):
            return (0, 1000.0 / float(speed["throughput"]))
        return (1, 0.0)

    def choose(self, ctx: RouteContext) -> Decision:
        return Decision(self.precision, self.name)


def _accuracy_rank(precision: str) -> int:
    return (
        PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)
    )


class SplitPolicy(PolicyBase):
    """Weighted traffic split; a request key (``x-request-key``) always lands on the same side."""

    name = "split"

    def __init__(self, model: Model, route: ModelRoute) -> None:
        weights = {p: w for p, w in route.weights.items() if w > 0}
        if not weights:
            raise ConfigError(f"routing for model {model.name!r}: split needs positive weights")
        for p in weights:
            _check_precision(model, p, "split weight for")
        total = sum(weights.values())
        self.default_precision = max(weights, key=lambda p: weights[p])
        self.cumulative: list[tuple[float, str]] = []
        acc = 0.0
        for p, w in weights.items():
            acc += w / total
            self.cumulative.append((acc, p))

    def choose(self, ctx: RouteContext) -> Decision:
        x = key_fraction(ctx.key) if ctx.key else ctx.rng.random()
        for bound, precision in self.cumulative:
            if x < bound:
                return Decision(precision, self.name)
        return Decision(self.cumulative[-1][1], self.name)


class ShadowPolicy(PolicyBase):
    """Serve ``precision`` and mirror a ``fraction`` of requests to ``reference`` (background)."""

    name = "shadow"

    def __init__(self, model: Model, route: ModelRoute) -> None:
        served = route.precision or _cheapest(model)
        self.precision = _check_precision(model, served, "precision")
        self.reference = _check_precision(model, route.shadow_reference, "shadow reference")
        self.fraction = route.shadow_fraction
        self.default_precision = self.precision

    def choose(self, ctx: RouteContext) -> Decision:
        mirror = self.fraction > 0 and ctx.rng.random() < self.fraction
        return Decision(self.precision, self.name, self.reference if mirror else None)


def _cheapest(model: Model) -> str:
    return model.precisions()[-1]


_POLICIES = PluginRegistry(
    "policy",
    ConfigError,
    {
        "fixed": "server.routing.policies:FixedPolicy",
        "auto": "server.routing.policies:AutoPolicy",
        "split": "server.routing.policies:SplitPolicy",
        "shadow": "server.routing.policies:ShadowPolicy",
        "slo": "server.routing.slo:SloPolicy",
    },
)


def register_policy(name: str, target: str) -> None:
    _POLICIES.register(name, target)


def policy_names() -> list[str]:
    return sorted(_POLICIES.names())


def make_policy(model: Model, route: ModelRoute) -> Policy:
    if route.policy not in _POLICIES:
        raise ConfigError(
            f"routing for model {model.name!r}: unknown policy {route.policy!r} "
            f"(known: {', '.join(policy_names())})"
        )
    return _POLICIES.load(route.policy)(model, route)


# ---- the router --------------------------------------------------------------------------------
class Router:
    """Decides the precision of each request to a logical model and its fallback candidates."""

    def __init__(self, repository: Repository, config: RoutingConfig | None = None) -> None:
        config = config or RoutingConfig()
        unknown = sorted(set(config.models) - set(repository.models))
        if unknown:
            raise ConfigError(f"routing file names unknown model(s): {', '.join(unknown)}")
        self._models = repository.models
        self._rng = random.Random(config.seed)
        self.routes = {name: config.for_model(name) for name in repository.models}
        self.policies = {
            name: make_policy(model, self.routes[name]) for name, model in repository.models.items()
        }

    def decide(
        self,
        model: str,
        requested: str | None = None,
        source: str = "request",
        key: str | None = None,
    ) -> Decision:
        m = self._models[model]
        if requested:
            precision = requested.strip().lower()
            if precision not in m.variants:
                raise ModelNotFound(
                    f"model {model!r} has no precision {requested!r} "
                    f"(available: {', '.join(m.precisions())})"
                )
            return Decision(precision, source)
        return self.policies[model].choose(RouteContext(key=key, rng=self._rng))

    def feedback(self, model: str) -> Callable[[str, float, bool], None] | None:
        """The policy's ``observe(precision, seconds, counts)`` when it learns from completed
        requests (``slo``); the gateway calls it once per request the policy routed."""
        policy = self.policies[model]
        return policy.observe if policy.learns else None

    def candidates(self, model: str, precision: str) -> list[str]:
        """``precision`` then the built precisions after it in the model's fallback chain."""
        m = self._models[model]
        chain = self.routes[model].fallback
        later = chain[chain.index(precision) + 1 :] if precision in chain else []
        out = [precision]
        out += [p for p in later if p in m.variants and p not in out]
        return out
