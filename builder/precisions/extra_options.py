"""A precision's own options, carried in ``BuildOptions.extra[KEY]`` (a dataclass, or the
mapping of its fields; absent: the defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from builder.errors import BuildError

_T = TypeVar("_T")


def from_extra(cls: type[_T], extra: Mapping[str, object], key: str, what: str) -> _T:
    """``cls`` from ``extra[key]``; BuildError naming ``what`` for a value that is not one."""
    value: Any = extra.get(key)
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise BuildError(f"options.extra[{key!r}] must be a mapping, got {value!r}")
    try:
        return cls(**dict(value))
    except TypeError as e:
        raise BuildError(f"bad {what} options {dict(value)}: {e}") from e
