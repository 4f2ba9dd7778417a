"""Triton's model repository extension: ``RepositoryIndex``, ``RepositoryModelLoad`` and
``RepositoryModelUnload`` (gRPC; HTTP ``POST /v2/repository/...``), per ``--model-control``.

- ``none`` (the default, Triton's NONE mode): the index answers; load and unload are refused
  with Triton's own answer (UNAVAILABLE, "explicit model load / unload is not allowed if
  polling is enabled").
- ``explicit``: load / unload a variant by its name (``digits_int8``), or all variants of a
  logical model by its name (``digits``). The upstream does the work: the embedded one opens or
  closes the variant's engine sessions, a Triton upstream forwards the call to every replica.
  An unloaded variant is unready, so requests routed to it fall back along the model's
  precision chain (the response's ``precision`` parameter names the variant that served it,
  ``fallback_from`` the unloaded one);
  a request for the variant's own name is UNAVAILABLE. Loading a name the gateway does not
  know re-reads the manifests: a variant the builder added to a model after start-up (its
  folder and manifest entry) is read, loaded and served without a restart. New logical models
  need a restart (their routing policy is set up at start-up).

Load and unload need the bearer token when one is set (``--auth-token-file``; the transports
admit them, server/dataplane/restricted.py). One call at a time. The gateway knows nothing of
this module: it keeps the set of unloaded variants (they do not make the server unready); this
module changes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from server.catalog import Model, Variant, add_new_variants, find_in_manifests
from server.dataplane import wording
from server.dataplane.gateway import Gateway
from server.errors import GatewayError, ModelNotFound, Unavailable, Unsupported

log = logging.getLogger(__name__)

MODES = ("none", "explicit")
NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"
UNLOADED = "unloaded"


class ModelControlRefused(Unavailable):
    """Load/unload in ``--model-control none`` (Triton answers UNAVAILABLE too)."""


class ModelControl:
    def __init__(self, gateway: Gateway, mode: str = "none") -> None:
        if mode not in MODES:
            raise ValueError(f"model control must be one of {MODES}, got {mode!r}")
        self.gateway = gateway
        self.mode = mode
        self._lock = asyncio.Lock()

    # ---- the API ------------------------------------------------------------------------------
    async def load(self, name: str, parameters: Mapping[str, Any]) -> None:
        variants = await self._begin(name, parameters, loading=True)
        async with self._lock:
            for v in variants:
                await self._call("load", v)
                self.gateway.unloaded.discard(v.name)
                log.info("model control: loaded %s", v.name)

    async def unload(self, name: str, parameters: Mapping[str, Any]) -> None:
        variants = await self._begin(name, parameters, loading=False)
        async with self._lock:
            for v in variants:
                await self._call("unload", v)
                self.gateway.unloaded.add(v.name)
                log.info("model control: unloaded %s", v.name)

    def index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of logical models and variants, Triton's states."""
        models = self.gateway.repository.models
        rows = []
        for name, version, state, reason in self.gateway.index():
            names = [v.name for v in models[name].variants.values()] if name in models else [name]
            if state != "READY" and all(n in self.gateway.unloaded for n in names):
                reason = UNLOADED
            if not ready_only or state == "READY":
                rows.append((name, version, state, reason))
        return rows

    # ---- helpers ------------------------------------------------------------------------------
    async def _begin(
        self,
        name: str,
        parameters: Mapping[str, Any],
        loading: bool,
    ) -> list[Variant]:
        if self.mode != "explicit":
            raise ModelControlRefused(NOT_ALLOWED)
        overrides = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
        if overrides:
            what = f"load parameters {overrides} are not supported"
            raise Unsupported(
                (wording.load_failed(name, what) if loading else what)
                + " (the gateway serves the repository as built; rebuild the variant and load "
                "it by name)"
            )
        if not name:
            raise ModelNotFound("model control needs a model name")
        async with self._lock:
            return self._resolve(name, loading)

    def _resolve(self, name: str, loading: bool) -> list[Variant]:
        repo = self.gateway.repository
        if loading:  # a variant the builder added since start-up becomes known here
            model = name if name in repo.models else None
            if model is None and repo.variant(name) is None:
                model = find_in_manifests(repo, name)
            if model is not None:
                for v in add_new_variants(repo, model):
                    self.gateway.add_variant(v)
                    log.info("model control: %s is new in the repository", v.name)
        try:
            target: Model | Variant = self.gateway.lookup(name)
        except ModelNotFound as e:  # Triton's "failed to load '...', ..." (wording.py)
            if loading:
                raise ModelNotFound(wording.load_failed(name, e.message)) from None
            raise
        return list(target.variants.values()) if isinstance(target, Model) else [target]

    async def _call(self, action: str, variant: Variant) -> None:
        upstream = self.gateway.upstream
        if not upstream.capabilities.model_control:
            raise Unsupported(f"upstream {upstream.name!r} cannot {action} models")
        try:
            await (upstream.load if action == "load" else upstream.unload)(variant)
        except GatewayError:
            raise
        except Exception as e:  # an engine's own failure: the client sees what went wrong
            raise Unavailable(f"{action} of {variant.name} failed: {e}") from e


__all__ = ["MODES", "NOT_ALLOWED", "ModelControl", "ModelControlRefused"]
