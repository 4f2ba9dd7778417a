"""One registry mechanism for every plug-in point (model source, precision, engine, upstream,
routing policy): a name maps to ``"module:attribute"``, imported only when first used, so a
plug-in's heavy dependencies (torch, openvino, tensorrt, ...) load only for those who use it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any


class PluginRegistry:
    def __init__(
        self,
        kind: str,
        error: type[Exception],
        entries: Mapping[str, str],
        missing_hint: str = "",
    ) -> None:
        self.kind = kind  # "engine", "precision", ... (used in messages)
        self.error = error  # the owning package's exception class
        self.missing_hint = missing_hint  # appended when a plug-in's import fails
        self._entries = dict(entries)

    def register(self, name: str, target: str) -> None:
        """Add or replace ``name`` -> ``"module:attribute"``."""
        self._entries[name] = target

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, name: str) -> Any:
        """The registered attribute (usually a class), imported now."""
        try:
            target = self._entries[name]
        except KeyError:
            known = ", ".join(self._entries)
            raise self.error(f"unknown {self.kind} {name!r}; known: {known}") from None
        module_name, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            hint = f"; {self.missing_hint}" if self.missing_hint else ""
            raise self.error(f"{self.kind} {name!r} is not available here ({e}){hint}") from e
