"""Precision pools: one upstream per pool, each variant dispatched to the pool of its precision.

The routing file names pools (``pools: {cpu: "triton+dns://triton-cpu:8001", gpu: ...}``) and
gives precisions a pool (``precision_pools: {int8: cpu, fp16: gpu}``, per model or in
``defaults``); variants whose precision has no pool go to the ``--upstream``. The core and the
router see one upstream (:class:`PooledUpstream`): a variant's readiness is its pool's, so the
model's fallback chain crosses pools when one is down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from server import metrics
from server.catalog import Repository, Variant
from server.errors import ConfigError, Unsupported
from server.upstreams.base import (
    Capabilities,
    Upstream,
    UpstreamBase,
    UpstreamSettings,
    create_upstream,
)
from server.upstreams.generation import Generation, GenerationRequest


class PooledUpstream(UpstreamBase):
    name = "pools"

    def __init__(
        self, pools: dict[str, Upstream], default: Upstream | None, assignment: dict[str, str]
    ) -> None:
        unknown = sorted(set(assignment.values()) - set(pools))
        if unknown:
            raise ConfigError(f"variants assigned to unknown pool(s): {', '.join(unknown)}")
        self.pools = pools
        self.default = default
        self.assignment = assignment  # variant name -> pool name
        members = [*pools.values(), *([default] if default is not None else [])]
        self._members = members
        self.capabilities = Capabilities(
            records_timing=True,  # observes the duration itself for pools that do not
            honours_deadline=all(u.capabilities.honours_deadline for u in members),
            forward=all(u.capabilities.forward for u in members),
            model_control=any(u.capabilities.model_control for u in members),
            generate=any(u.capabilities.generate for u in members),
            statistics=any(u.capabilities.statistics for u in members),
        )

    def upstream_for(self, variant: Variant) -> Upstream | None:
        pool = self.assignment.get(variant.name)
        return self.pools[pool] if pool is not None else self.default

    def problem(self, variant: Variant) -> str:
        u = self.upstream_for(variant)
        return u.problem(variant) if u is not None else "no pool and no --upstream"

    async def start(self) -> None:
        for u in self._members:
            await u.start()

    async def close(self) -> None:
        for u in self._members:
            await u.close()

    def ready(self, variant: Variant) -> bool:
        u = self.upstream_for(variant)
        return u is not None and u.ready(variant)

    def _require(self, variant: Variant) -> Upstream:
        u = self.upstream_for(variant)
        if u is None:  # ready() said False: the core does not call; a direct call is a bug
            raise ConfigError(f"variant {variant.name} has no pool and there is no --upstream")
        return u

    async def infer(
        self, variant: Variant, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        u = self._require(variant)
        started = time.monotonic()
        outputs = await u.infer(variant, inputs, deadline)
        self._observe(u, variant, started)
        return outputs

    async def forward(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes:
        u = self._require(variant)
        started = time.monotonic()
        reply = await u.forward(variant, payload, deadline)
        self._observe(u, variant, started)
        return reply

    async def generate(self, variant: Variant, request: GenerationRequest) -> Generation:
        u = self._require(variant)
        if not u.capabilities.generate:
            raise Unsupported(f"upstream {u.name!r} of {variant.name} does not serve LLMs")
        return await u.generate(variant, request)

    @staticmethod
    def _observe(u: Upstream, variant: Variant, started: float) -> None:
        """The call's duration, for a pool that does not record its own."""
        if not u.capabilities.records_timing:
            metrics.upstream_duration(variant.model, variant.precision).observe(
                time.monotonic() - started
            )

    async def replica_statistics(self) -> list[Any]:
        """Triton's statistics entries of each pool's own variants (a pool's Triton may have
        more models loaded: their counts are not the pool's), from the pools that keep them."""
        owners: list[tuple[Upstream, set[str]]] = [
            (u, {v for v, pool in self.assignment.items() if pool == name})
            for name, u in self.pools.items()
        ]
        if self.default is not None:
            owners.append((self.default, set()))
        owners = [(u, names) for u, names in owners if u.capabilities.statistics]
        parts = await asyncio.gather(*(u.replica_statistics() for u, _ in owners))
        out = []
        for (u, names), entries in zip(owners, parts, strict=True):
            if u is self.default:
                out += [e for e in entries if e.name not in self.assignment]
            else:
                out += [e for e in entries if e.name in names]
        return out

    async def server_versions(self) -> dict[str, str]:
        """Every pool's replicas' server versions, by address."""
        upstreams = [*self.pools.values(), *([self.default] if self.default else [])]
        parts = await asyncio.gather(*(u.server_versions() for u in upstreams))
        return {a: v for part in parts for a, v in part.items()}

    async def load(self, variant: Variant) -> None:
        await self._control("load", variant)

    async def unload(self, variant: Variant) -> None:
        await self._control("unload", variant)

    async def _control(self, action: str, variant: Variant) -> None:
        """Model control goes to the variant's pool (server/dataplane/model_control.py)."""
        u = self._require(variant)
        if not u.capabilities.model_control:
            raise Unsupported(f"upstream {u.name!r} of {variant.name} cannot {action} models")
        await (u.load if action == "load" else u.unload)(variant)


def create_pooled_upstream(
    default_spec: str | None,
    pools: dict[str, str],
    assignment: dict[str, str],
    repository: Repository,
    settings: UpstreamSettings | None = None,
) -> PooledUpstream:
    """Build each pool's upstream from its spec (its URL query: its settings, over
    ``settings``); the default only when a variant needs it."""
    members = {name: create_upstream(spec, repository, settings) for name, spec in pools.items()}
    unassigned = [v for v in repository.variants() if v.name not in assignment]
    default = (
        create_upstream(default_spec, repository, settings)
        if unassigned and default_spec is not None
        else None
    )
    return PooledUpstream(members, default, assignment)


__all__ = ["PooledUpstream", "create_pooled_upstream"]
