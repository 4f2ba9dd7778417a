"""The model repository's exception family, shared by the builder (which writes repositories)
and the gateway (which reads them). Each side translates it at its own boundary: the builder's
CLI prints one line and exits 2; the gateway turns it into :class:`server.errors.ConfigError`."""

from __future__ import annotations


class RepositoryError(Exception):
    """A model repository, or one of its files, cannot be read or written."""


class ManifestError(RepositoryError):
    """A manifest is unreadable or does not match the schema."""


class SchemaVersionError(ManifestError):
    """A manifest was written with another ``schema_version`` than this program reads."""


class ConfigFileError(RepositoryError):
    """A ``config.pbtxt`` is unreadable or not a valid Triton ModelConfig."""


class DtypeError(RepositoryError):
    """A tensor data type has no equivalent on the other side (numpy, Triton, KServe v2)."""
