"""The accuracy-budget search: the fastest variant within ``--accuracy-budget``.

Every quantized precision builds through :func:`search`. The fully quantized variant comes
first; when it is over budget, nodes are kept in higher precision in the order of a ranking
(``builder.drift``: the nodes whose quantization adds the most error first), cheap moves first:
1, 2, 4, ... kept nodes, then a bisection down to the fewest that meet the budget. Each
candidate is checked for quality and, where speed is measured, timed briefly against FP32 on
this host. The search stops when a candidate meets the budget, when candidates have become
slower than FP32 (keeping more only makes them slower still), or at its time and candidate
bounds. Of the candidates within budget and not slower than FP32 the fastest wins; when there
is none the outcome says "budget not met (best: loss X at Y x fp32)" and the pipeline does not
write the variant unless ``--keep-over-budget`` asks for it (labelled in the manifest).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MAX_CANDIDATES = 8  # candidates built after the fully quantized one
MAX_SECONDS = 900.0  # wall-clock bound of the search (checked between candidates)
# A variant must beat FP32 by this much to count as a result: the brief timing is noisy (on a
# shared 2-core host, a variant with every layer kept FP32 timed 1.03x FP32).
MIN_SPEEDUP = 1.05

# (kept nodes) -> (file written, accuracy loss in points)
MakeFn = Callable[[list[str]], tuple[Path, float]]
# (file) -> throughput vs FP32 on this host (None: not measured)
SpeedFn = Callable[[Path], float | None]
# (fully quantized file) -> node names, the first to keep in higher precision first
RankFn = Callable[[Path], Sequence[str]]


@dataclass
class SearchLimits:
    max_candidates: int = MAX_CANDIDATES
    max_seconds: float = MAX_SECONDS
    progress: bool = True


@dataclass
class Candidate:
    kept: list[str]
    loss: float
    speedup: float | None
    path: Path

    def record(self) -> dict[str, Any]:
        return {
            "kept": len(self.kept),
            "accuracy_loss": round(self.loss, 4),
            "speedup_vs_fp32": None if self.speedup is None else round(self.speedup, 3),
        }


@dataclass
class BudgetOutcome:
    budget: float | None
    met: bool
    chosen: Candidate
    status: str
    attempts: list[Candidate] = field(default_factory=list)

    def details(self) -> dict[str, Any]:
        """What the manifest records (``VariantRecord.details``)."""
        return {
            "accuracy_budget": self.budget,
            "budget_met": self.met,
            "budget_status": self.status,
            "fp32_kept_nodes": list(self.chosen.kept),
            "budget_attempts": [c.record() for c in self.attempts],
        }


def _fmt(c: Candidate) -> str:
    speed = "speed not measured" if c.speedup is None else f"{c.speedup:.2f}x fp32"
    return f"loss {c.loss:.3f} at {speed}, {len(c.kept)} kept"


def _fast_enough(c: Candidate) -> bool:
    return c.speedup is None or c.speedup >= MIN_SPEEDUP


def _sizes(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return [*sizes, n] if n else []


def search(
    rank: RankFn,
    make: MakeFn,
    speedup: SpeedFn | None,
    budget: float | None,
    out_path: Path,
    limits: SearchLimits | None = None,
) -> BudgetOutcome:
    """Build candidates with ``make`` and copy the chosen one to ``out_path``.

    ``make`` must write each candidate to a file of its own; ``rank`` is called (once) only
    when the fully quantized variant is over budget. Without a budget only the fully quantized
    variant is built (no timing); with one, see the module docstring.
    """
    limits = limits or SearchLimits()
    started = time.monotonic()
    tried: dict[int, Candidate] = {}
    ranked: list[str] = []

    def build(k: int) -> Candidate:
        if k not in tried:
            kept = list(ranked[:k])
            path, loss = make(kept)
            speed = speedup(path) if speedup is not None and budget is not None else None
            tried[k] = Candidate(kept, float(loss), speed, path)
            log.info("budget search: %s", _fmt(tried[k]))
        return tried[k]

    full = build(0)
    if budget is None:
        return _finish(BudgetOutcome(None, True, full, "no accuracy budget"), tried, out_path)

    bar = tqdm(total=limits.max_candidates, desc="accuracy budget", disable=not limits.progress)
    try:
        met = full if full.loss <= budget else None
        below = 0  # largest k known over budget
        if met is None and _fast_enough(full):  # a slower-than-fp32 start only gets slower
            ranked.extend(dict.fromkeys(rank(full.path)))
            for k in _sizes(len(ranked)):
                if _out_of_time(started, limits, len(tried) - 1):
                    break
                c = build(k)
                bar.update(1)
                bar.set_postfix_str(_fmt(c))
                if c.loss <= budget:
                    met = c
                    break
                below = k
                if not _fast_enough(c):
                    break  # keeping more layers only makes it slower still
            # Fewer kept layers are faster: bisect down between the last miss and the hit.
            lo, hi = below, len(met.kept) if met else 0
            while met is not None and hi - lo > 1:
                if _out_of_time(started, limits, len(tried) - 1):
                    break
                mid = (lo + hi) // 2
                c = build(mid)
                bar.update(1)
                bar.set_postfix_str(_fmt(c))
                if c.loss <= budget:
                    hi = mid
                else:
                    lo = mid
    finally:
        bar.close()
    return _finish(_choose(list(tried.values()), budget, len(ranked)), tried, out_path)


def _out_of_time(started: float, limits: SearchLimits, built: int) -> bool:
    if built >= limits.max_candidates:
        return True
    if time.monotonic() - started > limits.max_seconds:
        log.warning("budget search stopped at its %.0f s bound", limits.max_seconds)
        return True
    return False


def _choose(candidates: list[Candidate], budget: float, rankable: int) -> BudgetOutcome:
    # Keeping every rankable node leaves nothing quantized: the FP32 model again, no result.
    everything = [c for c in candidates if rankable and len(c.kept) >= rankable]
    candidates_left = [c for c in candidates if c not in everything]
    within = [c for c in candidates_left if c.loss <= budget and _fast_enough(c)]
    if within:
        # Fastest; without timings the fewest kept layers (the cheapest to run).
        best = max(
            within,
            key=lambda c: (c.speedup if c.speedup is not None else 0.0, -len(c.kept)),
        )
        return BudgetOutcome(budget, True, best, f"budget {budget:g} met: {_fmt(best)}", candidates)
    pool = candidates_left or candidates
    fast = [c for c in pool if _fast_enough(c)]
    best = min(fast or pool, key=lambda c: (c.loss, len(c.kept)))
    slow_hits = [c for c in candidates_left if c.loss <= budget]
    if slow_hits:
        hit = max(slow_hits, key=lambda c: c.speedup or 0.0)
        why = f"met only slower than {MIN_SPEEDUP:g}x fp32 ({_fmt(hit)})"
    elif any(c.loss <= budget for c in everything):
        why = f"met only with all {rankable} quantized layers kept FP32 (no quantization left)"
    else:
        why = "not met"
    return BudgetOutcome(
        budget, False, best, f"budget {budget:g} {why} (best: {_fmt(best)})", candidates
    )


def _finish(outcome: BudgetOutcome, tried: dict[int, Candidate], out_path: Path) -> BudgetOutcome:
    outcome.attempts = [tried[k] for k in sorted(tried)]
    if outcome.chosen.path != out_path:
        shutil.copyfile(outcome.chosen.path, out_path)
    return outcome
