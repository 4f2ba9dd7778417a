"""Users over time for a load test (``--schedule``), read by Locust's LoadTestShape.

Two forms (seconds, users):

- steps ``"0:4,60:8,120:12,180:4"``: from second 0 four users, from second 60 eight, ...; a final
  ``T:0`` ends the test at T, otherwise the last step lasts as long as the one before it;
- ramps ``"ramp:4-16:180"``: users go linearly from 4 to 16 over 180 s; several ramps chain one
  after another (``"ramp:4-4:30,ramp:4-16:120,ramp:16-4:120"``: hold, rise, fall).

Pure (no Locust import), so the CLI validates a schedule before anything starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loadtest.errors import ConfigError

_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+)\s*$")
_RAMP = re.compile(r"^\s*ramp\s*:\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    users_from: int
    users_to: int  # == users_from for a step

    def users_at(self, t: float) -> int:
        if self.users_from == self.users_to or self.end_s <= self.start_s:
            return self.users_from
        f = (t - self.start_s) / (self.end_s - self.start_s)
        return round(self.users_from + f * (self.users_to - self.users_from))


@dataclass(frozen=True)
class Schedule:
    text: str
    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        return self.segments[-1].end_s

    @property
    def peak_users(self) -> int:
        return max(max(s.users_from, s.users_to) for s in self.segments)

    def users_at(self, t: float) -> int | None:
        """Users wanted ``t`` seconds into the test; None once the schedule is over."""
        if t >= self.duration_s:
            return None
        for seg in self.segments:
            if seg.start_s <= t < seg.end_s:
                return seg.users_at(t)
        return self.segments[-1].users_to


def _steps(items: list[str], text: str) -> list[Segment]:
    points = []
    for item in items:
        m = _STEP.match(item)
        if not m:
            raise ConfigError(f"--schedule: {item!r} is not SECONDS:USERS (in {text!r})")
        points.append((float(m.group(1)), int(m.group(2))))
    if points[0][0] != 0:
        raise ConfigError(f"--schedule must start at second 0, got {points[0][0]:g} in {text!r}")
    times = [t for t, _ in points]
    if times != sorted(times) or len(set(times)) != len(times):
        raise ConfigError(f"--schedule times must increase, got {text!r}")
    if points[-1][1] == 0 and len(points) > 1:  # "T:0" ends the test at T
        ends = times[1:]
    else:
        last = times[-1] - times[-2] if len(times) > 1 else 60.0
        ends = [*times[1:], times[-1] + last]
    segments = [Segment(t, end, u, u) for (t, u), end in zip(points, ends, strict=False)]
    if any(s.users_from < 1 for s in segments):
        raise ConfigError(f"--schedule: users must be >= 1 before the end, got {text!r}")
    return segments


def _ramps(items: list[str], text: str) -> list[Segment]:
    segments: list[Segment] = []
    t = 0.0
    for item in items:
        m = _RAMP.match(item)
        if not m:
            raise ConfigError(
                f"--schedule: {item!r} is not ramp:FROM-TO:SECONDS (in {text!r}; "
                "steps and ramps do not mix)"
            )
        a, b, d = int(m.group(1)), int(m.group(2)), float(m.group(3))
        if a < 1 or b < 1 or d <= 0:
            raise ConfigError(f"--schedule: {item!r} needs users >= 1 and seconds > 0")
        segments.append(Segment(t, t + d, a, b))
        t += d
    return segments


def parse_schedule(text: str) -> Schedule:
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError("--schedule is empty")
    ramps = items[0].strip().startswith("ramp")
    segments = _ramps(items, text) if ramps else _steps(items, text)
    return Schedule(text=text.strip(), segments=tuple(segments))
