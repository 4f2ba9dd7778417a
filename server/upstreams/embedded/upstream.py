"""The embedded upstream: engine sessions (ONNX Runtime by default) inside the gateway process.

Per variant: ``instance_group`` count sessions loaded through ``common.engines`` (honouring the
manifest's ``engine`` / ``engine_options``) and a
:class:`server.upstreams.embedded.batching.DynamicBatcher` applying the config's
``dynamic_batching`` (and its ``default_queue_policy.max_queue_size``) with one worker thread per
instance, so the event loop never blocks; a variant whose worker died for good reports unready. A
variant that fails to load stays unready (the core falls back) and its reason is logged. Model
control (``load`` / ``unload``) opens a variant's sessions or closes them after the requests they
are running.

Decoder LLM variants (``Variant.kind == "llm"``) get an ``LlmRunner``
(server/upstreams/embedded/llm.py) instead of sessions and a batcher: onnxruntime-genai
generators with bounded sequences and queue (``?sequences=``, ``?queue=``, ``?max_tokens=``),
served through ``generate``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from common.engines import EngineError, EngineSession, get_engine
from server.catalog import LLM, Repository, Variant
from server.errors import InvalidInput, Unsupported
from server.upstreams.base import (
    Capabilities,
    UpstreamBase,
    UpstreamSettings,
    UpstreamUnavailable,
    report_ready,
)
from server.upstreams.embedded.batching import BatchPolicy, DynamicBatcher
from server.upstreams.generation import GenerationRequest

log = logging.getLogger(__name__)

# Engine runs shorter than this may run on the event loop's thread (see BatchPolicy.inline_max_s).
INLINE_MAX_S = 0.002


def max_queue_size(variant: Variant) -> int:
    """The config's ``dynamic_batching.default_queue_policy.max_queue_size`` (0 = unbounded)."""
    cfg = variant.config
    if not cfg.HasField("dynamic_batching"):
        return 0
    return max(0, int(cfg.dynamic_batching.default_queue_policy.max_queue_size))


class EmbeddedUpstream(UpstreamBase):
    name = "embedded"
    # the batcher observes queue/upstream duration and batch size itself, and its timer fails
    # a request at its deadline; load/unload open and close a variant's sessions
    capabilities = Capabilities(
        records_timing=True, honours_deadline=True, model_control=True, generate=True
    )

    def __init__(self, address: str, repository: Repository, settings: UpstreamSettings) -> None:
        self._repository = repository
        self._settings = settings
        self._batchers: dict[str, DynamicBatcher] = {}
        self._llms: dict[str, Any] = {}  # variant name -> LlmRunner (imported when one exists)
        self.problems: dict[str, str] = {}
        # Loading (and warm-up) only; each instance then runs on its own batcher thread.
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, settings.max_workers or 2), thread_name_prefix="load"
        )

    def _load_sessions(self, variant: Variant) -> list[EngineSession]:
        engine = get_engine(variant.record.engine)
        sessions = [
            engine.load(variant.path, variant.record.engine_options, self._settings.threads)
            for _ in range(variant.serving.instance_count)
        ]
        if variant.serving.warmup:
            self._warm(variant, sessions)
        return sessions

    @staticmethod
    def _warm(variant: Variant, sessions: list[EngineSession]) -> None:
        batch = (1,) if variant.max_batch_size > 0 else ()
        feeds = {
            t.name: np.zeros(batch + tuple(d if d > 0 else 1 for d in t.shape), dtype=t.dtype)
            for t in variant.inputs
        }
        for s in sessions:
            try:
                s.run(feeds)
            except EngineError as e:  # a model with data-dependent shapes: skip warm-up
                log.debug("warm-up of %s skipped: %s", variant.name, e)

    async def start(self) -> None:
        for variant in self._repository.variants():
            await self._open(variant)

    async def _open(self, variant: Variant) -> bool:
        """Load ``variant``'s sessions and start its batcher; False (and logged) when it fails."""
        if variant.problem:
            self._fail(variant, variant.problem)
            return False
        if variant.kind == LLM:
            return await self._open_llm(variant)
        loop = asyncio.get_running_loop()
        try:
            sessions = await loop.run_in_executor(self._executor, self._load_sessions, variant)
        except EngineError as e:
            self._fail(variant, str(e))
            return False
        s = variant.serving
        policy = BatchPolicy(
            max_batch_size=s.max_batch_size,
            dynamic=s.dynamic_batching,
            preferred_sizes=list(s.preferred_batch_sizes),
            max_queue_delay_s=s.max_queue_delay_us / 1e6,
            inline_max_s=INLINE_MAX_S,
            max_queue_size=max_queue_size(variant),
        )
        batcher = DynamicBatcher(
            sessions, policy, (variant.model, variant.precision), name=variant.name
        )
        batcher.start()
        self._batchers[variant.name] = batcher
        self.problems.pop(variant.name, None)
        report_ready(self.name, variant, True)
        return True

    async def _open_llm(self, variant: Variant) -> bool:
        from common.llm import LlmError
        from server.upstreams.embedded.llm import LlmRunner

        s = self._settings
        load = lambda: LlmRunner.load(  # noqa: E731
            variant, s.threads, s.llm_sequences, s.llm_queue, s.llm_max_tokens
        )
        try:
            runner = await asyncio.get_running_loop().run_in_executor(self._executor, load)
        except (LlmError, ImportError) as e:
            self._fail(variant, str(e))
            return False
        self._llms[variant.name] = runner
        self.problems.pop(variant.name, None)
        report_ready(self.name, variant, True)
        return True

    async def generate(self, variant: Variant, request: GenerationRequest) -> Any:
        if variant.kind != LLM:
            raise Unsupported(f"model {variant.name!r} is not a generative (LLM) model")
        runner = self._llms.get(variant.name)
        if runner is None:
            reason = self.problems.get(variant.name, "not loaded")
            raise UpstreamUnavailable(f"variant {variant.name} is not ready: {reason}")
        return await runner.generate(request)

    # ---- model control (server/dataplane/model_control.py)
    # ----------------------------------------------
    async def load(self, variant: Variant) -> None:
        """Open the variant's sessions (nothing to do when it is loaded)."""
        if variant.name in self._batchers or variant.name in self._llms:
            return
        if not await self._open(variant):
            raise InvalidInput(
                f"load failed for model {variant.name!r}: {self.problems[variant.name]}"
            )

    async def unload(self, variant: Variant) -> None:
        """Stop routing to the variant; requests it is running finish, then its sessions close."""
        batcher = self._batchers.pop(variant.name, None)
        runner = self._llms.pop(variant.name, None)
        self._fail(variant, "unloaded")
        if batcher is not None:
            await batcher.close()
        if runner is not None:
            await runner.close(cancel=False)

    def _fail(self, variant: Variant, reason: str) -> None:
        self.problems[variant.name] = reason
        log.warning("variant %s is not servable: %s", variant.name, reason)
        report_ready(self.name, variant, False)

    def ready(self, variant: Variant) -> bool:
        if variant.kind == LLM:
            return variant.name in self._llms
        batcher = self._batchers.get(variant.name)
        return batcher is not None and batcher.alive()

    def problem(self, variant: Variant) -> str:
        return self.problems.get(variant.name, "")

    async def infer(
        self, variant: Variant, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        batcher = self._batchers.get(variant.name)
        if batcher is None:
            reason = self.problems.get(variant.name, "not loaded")
            raise UpstreamUnavailable(f"variant {variant.name} is not ready: {reason}")
        return await batcher.submit(inputs, deadline)

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()
        for runner in self._llms.values():
            await runner.close()
        self._llms.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
