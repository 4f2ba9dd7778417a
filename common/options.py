"""Command-line options declared once, on the dataclass that holds them.

A package that owns settings declares them as a dataclass whose fields carry :func:`option`
metadata (flag, help, how a command-line word becomes the value and back). From that one
definition this module builds the package's argparse group (:func:`add_group`), the dataclass
from parsed arguments (:func:`from_namespace`), the argument list that reproduces an instance
(:func:`to_argv`: a supervisor hands its options to the processes it starts) and a Markdown
reference (:func:`markdown`). Fields without :func:`option` metadata are not options (values
derived or set by the program). Validation stays in the dataclass (``__post_init__``), so options
built in Python and options parsed from a command line are checked alike.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol

_KEY = "option"


@dataclasses.dataclass(frozen=True)
class Option:
    help: str
    parse: Callable[[str], Any] = str  # a command-line word -> the field's value
    format: Callable[[Any], str] = str  # the value -> a word ``parse`` reads back
    metavar: str | None = None
    choices: Sequence[str] | None = None
    default_text: str | None = None  # the default as the reference shows it (else ``format``)
    name: str | None = None  # the flag's name when it is not the field's
    # internal: parsed and written back by to_argv (a supervisor -> its processes), but not
    # shown by --help nor in the reference
    hidden: bool = False


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    parse: Callable[[str], Any] = str,
    format: Callable[[Any], str] = str,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    default_text: str | None = None,
    name: str | None = None,
    hidden: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also the option ``--FIELD-NAME`` (or ``--NAME``; no default:
    required; ``hidden``: internal, left out of ``--help`` and the reference)."""
    meta = {_KEY: Option(help, parse, format, metavar, choices, default_text, name, hidden)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class OptionGroup(Protocol):
    """A dataclass with :func:`option` fields; ``group`` is its title in ``--help``."""

    group: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


def flag(f: dataclasses.Field[Any]) -> str:
    return "--" + (f.metadata[_KEY].name or f.name).replace("_", "-")


def options(cls: type[OptionGroup] | OptionGroup) -> list[tuple[dataclasses.Field[Any], Option]]:
    """The (field, option) pairs of a group, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]  # type: ignore[arg-type]


def _dest(cls: type[OptionGroup], f: dataclasses.Field[Any]) -> str:
    return f"{cls.group}.{f.name}"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports ``ArgumentTypeError`` with its own message: the owner's words."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise
        except Exception as e:  # the owning package's error, or ValueError from int()/float()
            raise argparse.ArgumentTypeError(str(e) or f"invalid value {text!r}") from e

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_group(parser: argparse.ArgumentParser, cls: type[OptionGroup]) -> None:
    description = " ".join((cls.__doc__ or "").split()).replace("``", "")
    group = parser.add_argument_group(cls.group, description)
    for f, o in options(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {
            "dest": _dest(cls, f),
            "help": (
                o.help + ("" if required else f" (default: {describe_default(f, o)})")
            ).replace("%", "%%"),
            "type": _argument_type(o.parse),
            "metavar": o.metavar or (None if o.choices else f.name.upper()),
        }
        if o.choices:
            kwargs["choices"] = [o.parse(c) for c in o.choices]
            kwargs["metavar"] = o.metavar or "{" + ",".join(o.choices) + "}"
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS  # absent: the dataclass's own default
        if o.hidden:
            kwargs["help"] = argparse.SUPPRESS
        group.add_argument(flag(f), **kwargs)


def describe_default(f: dataclasses.Field[Any], o: Option) -> str:
    if o.default_text is not None:
        return o.default_text
    value = _default(f)
    if value is None:
        return "none"
    return o.format(value) or "none"


def from_namespace(cls: type[Any], namespace: argparse.Namespace, **extra: Any) -> Any:
    """The group's dataclass from parsed arguments (absent options keep their defaults);
    ``extra``: fields that are not options."""
    given = vars(namespace)
    kwargs = {f.name: given[_dest(cls, f)] for f, _ in options(cls) if _dest(cls, f) in given}
    return cls(**kwargs, **extra)


def to_argv(instance: Any) -> list[str]:
    """``["--flag", "word", ...]`` for every option whose value differs from its default."""
    argv: list[str] = []
    for f, o in options(instance):
        value = getattr(instance, f.name)
        if value != _default(f):
            argv += [flag(f), o.format(value)]
    return argv


def parse_pairs(text: str, keys: Sequence[str], what: str, sep: str = ",") -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}``; ValueError naming an unknown or repeated key."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(sep))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{what}: {item!r} is not KEY=VALUE ({', '.join(keys)})")
        if key not in keys:
            raise ValueError(f"{what}: unknown key {key!r} (known: {', '.join(keys)})")
        if key in pairs:
            raise ValueError(f"{what}: {key!r} given twice")
        pairs[key] = value.strip()
    return pairs


def markdown(groups: Iterable[type[OptionGroup]], title: str, intro: str = "") -> str:
    """A reference page: one table per group (option, default, meaning)."""
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    for cls in groups:
        lines += [f"## {cls.group}", "", " ".join((cls.__doc__ or "").split()), ""]
        lines += ["| option | default | meaning |", "|---|---|---|"]
        for f, o in options(cls):
            if o.hidden:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = "required" if required else f"`{describe_default(f, o)}`"
            metavar = o.metavar or ("|".join(o.choices) if o.choices else f.name.upper())
            cells = [f"`{flag(f)} {metavar}`", default, o.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        extra = getattr(cls, "reference", None)  # more the group documents (a table of keys)
        if extra is not None:
            lines += [extra(), ""]
    return "\n".join(lines)
