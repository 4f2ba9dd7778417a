"""The one generation path for decoder LLM variants (``Variant.kind == "llm"``), whatever the
API: OpenAI's (server/transports/http/openai.py), Triton's generate extension (HTTP) and
``ModelStreamInfer`` of a decoupled model (gRPC).

:func:`start_generation` looks the name up (a logical model routes as for inference: the
``precision`` parameter, then ``x-precision``, then the model's policy; a variant name is that
variant), runs the request on the first ready candidate of the fallback chain and returns a
:class:`TextStream` once the upstream admitted it (prompt tokenized and within the context, a
sequence slot held) - errors up to there are raised before any text, so the transport can
answer with a status. The stream's :meth:`TextStream.chunks` yields the text and records the
metrics: time to first token, inter-token latency, prompt and output tokens per precision,
requests by finish reason, ``precision_serve_requests_total`` and the statistics. A stream left
before its end (the client went away) is cancelled: the upstream stops generating.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.llm import Chunk
from server import metrics
from server.catalog import LLM, Model, Variant
from server.dataplane.gateway import Gateway, InferRequest, counted_failure
from server.errors import GatewayError, InvalidInput, Unavailable, Unsupported
from server.routing.policies import Decision
from server.upstreams.base import UpstreamUnavailable
from server.upstreams.generation import Generation, GenerationRequest

FINISH_CANCELLED = "cancelled"


@dataclass
class GenerateRequest:
    model: str  # a logical model or a variant name
    request: GenerationRequest
    version: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)  # ``precision`` routes
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    protocol: str = "http"


class TextStream:
    """An admitted generation (see the module docstring)."""

    def __init__(
        self,
        gateway: Gateway,
        variant: Variant,
        decision: Decision,
        generation: Generation,
        protocol: str,
        started: float,
    ) -> None:
        self.variant = variant
        self.precision = variant.precision
        self.fallback_from = decision.precision if decision.precision != variant.precision else ""
        self.prompt_tokens = generation.prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._gateway = gateway
        self._generation = generation
        self._protocol = protocol
        self._started = started
        self._recorded = False
        self._inflight = metrics.inflight(variant.model)
        self._inflight.inc()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The generated text, chunk by chunk; the last carries ``finish_reason``. Leaving the
        loop early cancels the generation."""
        labels = (self.variant.model, self.precision)
        last: float | None = None
        status = "CANCELLED"
        try:
            async for chunk in self._generation:
                now = time.monotonic()
                if chunk.tokens:
                    if last is None:
                        metrics.llm_ttft(*labels).observe(now - self._started)
                    else:
                        gap = (now - last) / chunk.tokens
                        itl = metrics.llm_itl(*labels)
                        for _ in range(chunk.tokens):
                            itl.observe(gap)
                    last = now
                self.completion_tokens += chunk.tokens
                if chunk.finish_reason is not None:
                    self.finish_reason = chunk.finish_reason
                    status = "CANCELLED" if chunk.finish_reason == FINISH_CANCELLED else "ok"
                yield chunk
        except GatewayError as e:
            status = e.code
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            if self.finish_reason is None:
                self._generation.cancel()
            self._record(status)

    async def close(self) -> None:
        """Stop the generation if it is still running (idempotent); records it as cancelled."""
        if self.finish_reason is None:
            self._generation.cancel()
        self._record("CANCELLED")

    def _record(self, status: str) -> None:
        if self._recorded:
            return
        self._recorded = True
        self._inflight.dec()
        model, precision = self.variant.model, self.precision
        finish = self.finish_reason or (FINISH_CANCELLED if status == "CANCELLED" else "error")
        metrics.llm_finishes(model, precision, finish).inc()
        metrics.llm_prompt_tokens(model, precision).observe(self.prompt_tokens)
        metrics.llm_output_tokens(model, precision).observe(self.completion_tokens)
        metrics.requests(model, precision, self._protocol, status).inc()
        elapsed = time.monotonic() - self._started
        metrics.request_duration(model, precision).observe(elapsed)
        self._gateway._record(self.variant, 1, self._started, ok=status == "ok")


async def start_generation(gateway: Gateway, request: GenerateRequest) -> TextStream:
    """Route and admit ``request`` (module docstring); raises GatewayErrors, counted."""
    started = time.monotonic()
    model_label, precision_label = "unknown", "none"
    try:
        target = gateway.lookup(request.model, request.version)
        model = gateway.repository.models[target.model] if isinstance(target, Variant) else target
        model_label = model.name
        if model.kind != LLM:
            raise InvalidInput(
                f"model {request.model!r} is not a generative model (a decoupled LLM); use "
                "inference (ModelInfer, /v2/models/{m}/infer) for it"
            )
        if isinstance(target, Variant):
            decision = Decision(target.precision, "variant")
            candidates = [target.precision]
        else:
            routed = InferRequest(
                model=model.name,
                inputs=[],
                parameters=request.parameters,
                headers=request.headers,
            )
            decision = gateway.decide(model, routed)
            candidates = gateway.router.candidates(model.name, decision.precision)
        precision_label = decision.precision
        variant, generation = await _first_ready(gateway, model, candidates, request.request)
        precision_label = variant.precision
        gateway.count_routing(model, target, decision, variant)
        return TextStream(gateway, variant, decision, generation, request.protocol, started)
    except (Exception, asyncio.CancelledError) as e:
        error = counted_failure(e, model_label, precision_label, request.protocol, None)
        if error is e:
            raise
        raise error from e


async def _first_ready(
    gateway: Gateway, model: Model, candidates: list[str], request: GenerationRequest
) -> tuple[Variant, Generation]:
    upstream = gateway.upstream
    if not upstream.capabilities.generate:
        raise Unsupported(f"upstream {upstream.name!r} does not serve generative (LLM) models")
    reasons = []
    for precision in candidates:
        variant = model.variants[precision]
        if not upstream.ready(variant):
            reasons.append(f"{variant.name}: not ready")
            continue
        try:
            return variant, await upstream.generate(variant, request)
        except UpstreamUnavailable as e:
            reasons.append(f"{variant.name}: {e.message}")
    tried = ", ".join(model.variants[p].name for p in candidates)
    raise Unavailable(f"upstream unavailable for model {model.name!r} (tried {tried})")


__all__ = ["FINISH_CANCELLED", "GenerateRequest", "TextStream", "start_generation"]
