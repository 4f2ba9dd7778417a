"""``--restricted-api``: API groups that need the bearer token too (Triton's categories).

Triton restricts groups of its protocol with ``--grpc-restricted-protocol`` /
``--http-restricted-api``; the gateway takes the same group names and requires its one token
(``--auth-token-file`` or ``PRECISION_SERVE_AUTH_TOKEN``) on them. Inference, system shared memory
and loading or unloading models always need the token when one is set. Each transport asks
:func:`grpc_access` / :func:`http_access` what a call needs and hands that to
:meth:`server.dataplane.gateway.Gateway.admit`, once per call, before it reads the call's body.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import ConfigError

# Triton's protocol groups (docs/user_guide/inference_protocols.md, "Limit Endpoint Access")
GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

_GRPC = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
}
_GRPC_WORDS = (
    ("SharedMemory", "shared-memory"),
    ("Repository", "model-repository"),
    ("Trace", "trace"),
    ("Log", "logging"),
)
_HTTP_SUFFIX = (
    ("/infer", "inference"),
    ("/generate", "inference"),
    ("/generate_stream", "inference"),
    ("/ready", "health"),
    ("/config", "model-config"),
    ("/stats", "statistics"),
)
_HTTP_PREFIX = (
    ("/v2/health/", "health"),
    ("/v2/repository", "model-repository"),
    ("/v2/systemsharedmemory", "shared-memory"),
    ("/v2/cudasharedmemory", "shared-memory"),
    ("/v2/trace", "trace"),
    ("/v2/logging", "logging"),
    ("/v2/models/stats", "statistics"),
    ("/v2/models/", "metadata"),
    ("/v1/models", "metadata"),  # the OpenAI-compatible API (server/transports/http/openai.py)
    ("/v1/", "inference"),
)


def parse_groups(value: str | None) -> frozenset[str]:
    """``health,metadata`` -> the groups; ConfigError for an unknown one."""
    groups = frozenset(g.strip() for g in (value or "").split(",") if g.strip())
    unknown = sorted(groups - set(GROUPS))
    if unknown:
        raise ConfigError(
            f"--restricted-api: unknown group(s) {', '.join(unknown)} (known: {', '.join(GROUPS)})"
        )
    return groups


@dataclass(frozen=True)
class Access:
    """What a call needs: ``group`` (Triton's, for ``--restricted-api``; None when unknown), and
    ``always``: the token whenever one is set, restricted or not."""

    group: str | None
    always: bool = False


_ALWAYS_GROUPS = frozenset({"inference"})
_MODEL_CONTROL = ("RepositoryModelLoad", "RepositoryModelUnload")


def grpc_access(method: str) -> Access:
    """What a GRPCInferenceService method needs."""
    group = grpc_group(method)
    always = (
        group in _ALWAYS_GROUPS
        or method.startswith("SystemSharedMemory")
        or method in _MODEL_CONTROL
    )
    return Access(group, always)


def http_access(path: str) -> Access:
    """What a call to an HTTP path needs (load and unload are POSTs; every other path under
    ``/v2/repository`` only reads)."""
    group = http_group(path)
    always = (
        group in _ALWAYS_GROUPS
        or path.startswith("/v2/systemsharedmemory")
        or (group == "model-repository" and path.endswith(("/load", "/unload")))
    )
    return Access(group, always)


def grpc_group(method: str) -> str | None:
    """The group of a GRPCInferenceService method (None: none known)."""
    group = _GRPC.get(method)
    if group is None:
        group = next((g for word, g in _GRPC_WORDS if word in method), None)
    return group


def http_group(path: str) -> str | None:
    """The group of an HTTP path (``/v2`` itself is metadata)."""
    if path.rstrip("/") == "/v2":
        return "metadata"
    for suffix, group in _HTTP_SUFFIX:
        if path.endswith(suffix):
            return group
    return next((g for prefix, g in _HTTP_PREFIX if path.startswith(prefix)), None)
