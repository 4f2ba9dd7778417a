"""The ``slo`` block of a routing file: its pydantic file form and the settings dataclass.

Kept apart from server/routing/slo.py (the controller and the policy) so server/routing/policies.py
can parse the routing file without importing the policy, and the policy can import the routing
types.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SloFile(BaseModel):
    """``slo:`` under a model (or ``defaults``) in the routing file."""

    model_config = ConfigDict(extra="forbid")
    p99_ms: float = Field(gt=0)
    # the mix's traffic-weighted manifest accuracy_loss may not exceed this (points, 0..100);
    # default: the model's ``accuracy_budget``, else 1.0
    accuracy_budget: float | None = Field(None, ge=0.0)
    window_requests: int = Field(200, ge=1)  # a decision after this many completions ...
    window_ms: float = Field(2000.0, gt=0)  # ... or at the first completion after this long
    shift_up_above: float = Field(0.9, gt=0)  # x objective: estimated p99 counts as hot
    shift_down_below: float = Field(0.6, gt=0)  # x objective: estimated p99 counts as cool
    up_windows: int = Field(2, ge=1)  # consecutive hot windows before a shift to faster ...
    fast_shift_above: float = Field(1.5, gt=0)  # ... or one window above this x objective
    down_windows: int = Field(3, ge=1)  # consecutive cool windows before a shift back
    step: float = Field(0.1, gt=0, le=1)  # share of traffic moved per shift (the least)
    feed_forward: bool = True  # jump to a level whose estimated capacity covers the arrivals
    headroom: float = Field(1.1, ge=1.0)  # ... times this
    min_speedup: float = Field(1.15, ge=1.0)  # a rung must be this much faster than the last

    @model_validator(mode="after")
    def _band(self) -> SloFile:
        if self.shift_down_below >= self.shift_up_above:
            raise ValueError(
                f"shift_down_below ({self.shift_down_below}) must be below shift_up_above "
                f"({self.shift_up_above}): the gap between them is the hysteresis"
            )
        if self.fast_shift_above < self.shift_up_above:
            raise ValueError(
                f"fast_shift_above ({self.fast_shift_above}) must be at least shift_up_above "
                f"({self.shift_up_above})"
            )
        return self


@dataclass(frozen=True)
class SloSettings:
    """A model's latency objective and how the controller steers towards it."""

    p99_s: float
    accuracy_budget: float | None = None
    window_requests: int = 200
    window_s: float = 2.0
    shift_up_above: float = 0.9
    shift_down_below: float = 0.6
    up_windows: int = 2
    fast_shift_above: float = 1.5
    down_windows: int = 3
    step: float = 0.1
    feed_forward: bool = True
    headroom: float = 1.1
    min_speedup: float = 1.15

    def __post_init__(self) -> None:
        if self.p99_s <= 0:
            raise ValueError(f"slo p99 must be positive, got {self.p99_s}s")
        if not 0 < self.shift_down_below < self.shift_up_above:
            raise ValueError(
                f"slo shift_down_below {self.shift_down_below} must be in (0, shift_up_above "
                f"{self.shift_up_above})"
            )
        if not 0 < self.step <= 1:
            raise ValueError(f"slo step must be in (0, 1], got {self.step}")
        if self.fast_shift_above < self.shift_up_above:
            raise ValueError(
                f"slo fast_shift_above {self.fast_shift_above} must be at least shift_up_above "
                f"{self.shift_up_above}"
            )
        if self.headroom < 1 or self.min_speedup < 1:
            raise ValueError(
                f"slo headroom ({self.headroom}) and min_speedup ({self.min_speedup}) must be >= 1"
            )

    @classmethod
    def from_file(cls, f: SloFile) -> SloSettings:
        return cls(
            p99_s=f.p99_ms / 1000.0,
            accuracy_budget=f.accuracy_budget,
            window_requests=f.window_requests,
            window_s=f.window_ms / 1000.0,
            shift_up_above=f.shift_up_above,
            shift_down_below=f.shift_down_below,
            up_windows=f.up_windows,
            fast_shift_above=f.fast_shift_above,
            down_windows=f.down_windows,
            step=f.step,
            feed_forward=f.feed_forward,
            headroom=f.headroom,
            min_speedup=f.min_speedup,
        )
