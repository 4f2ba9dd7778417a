"""``--restricted-api``: API groups that need the bearer token too (Triton's categories).

Triton restricts groups of its protocol with ``--grpc-restricted-protocol`` /
``--http-restricted-api``; the gateway takes the same group names and requires its one token
(``--auth-token-file`` or ``PRECISION_SERVE_AUTH_TOKEN``) on them. Inference always needs the
token when one is set. Each transport asks :func:`grpc_group` / :func:`http_group` which group a
call is in.
"""

from __future__ import annotations

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
