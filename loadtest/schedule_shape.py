"""Locust LoadTestShape for ``--schedule`` (loadtest/schedule.py); loaded next to the user class
as ``-f loadtest/locustfile.py,loadtest/schedule_shape.py``. Locust uses a shape class whenever
one is in a loaded file, so it lives apart from locustfile.py: fixed-users steps stay as they were.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtest.schedule import Schedule, parse_schedule

SPAWN_RATE = 1000  # users/s: a step is a step


class ScheduleShape(LoadTestShape):
    _schedule: Schedule | None = None

    def tick(self) -> tuple[int, float] | None:
        if self._schedule is None:
            opts = self.runner.environment.parsed_options if self.runner else None
            text = getattr(opts, "schedule", "") if opts else ""
            if not text:
                return None
            self._schedule = parse_schedule(text)
        users = self._schedule.users_at(self.get_run_time())
        return None if users is None else (users, SPAWN_RATE)
