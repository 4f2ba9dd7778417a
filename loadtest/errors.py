"""The load test's exception family; ``precision-loadtest`` turns any of these into one line."""

from __future__ import annotations


class LoadTestError(Exception):
    """Base class: a load test could not be run or reported, for a reason the user can act on."""


class ConfigError(LoadTestError):
    """An option is invalid (names the option, expected vs got)."""


class StepError(LoadTestError):
    """A Locust step failed to run or left no results."""
