"""Whether a model's quality figures are evidence a routing policy may act on.

The builder records per variant where its quality figures were measured (manifest
``quality_source``: labelled data, user data without labels, synthetic). Figures measured on
seeded noise say little about real inputs, so the policies that pick a precision by quality
(``auto``, ``slo``) call :func:`quality_is_evidence` once per model at start-up: when it says
no, they serve the reference precision (fp32) and report the reason (start-up log, the
repository index). The routing file opts in per model or in ``defaults`` with
``accept_synthetic_quality: true``. A policy's ``reason`` attribute, where it has one, is its
logical model's ``reason`` in the repository index (server/dataplane/gateway.py ``Gateway.index``).
"""

from __future__ import annotations

from typing import Protocol

from common.model_repository import SYNTHETIC
from server.catalog import Model


class _Route(Protocol):
    accept_synthetic_quality: bool


def synthetic_variants(model: Model) -> list[str]:
    """The precisions whose quality figures were measured on synthetic data, except the
    reference's (fp32 where built: its figures compare it with itself)."""
    reference = model.precisions()[0]
    return [
        p
        for p in model.precisions()
        if p != reference and model.manifest.quality_source(p) == SYNTHETIC
    ]


def quality_is_evidence(model: Model, route: _Route) -> tuple[bool, str]:
    """(True, "") when a policy may route ``model`` on its quality figures; else (False, a
    one-line reason naming the variants and the opt-in). ``route`` is the model's
    ``server.routing.policies.ModelRoute`` (anything with ``accept_synthetic_quality``)."""
    synthetic = synthetic_variants(model)
    if not synthetic:
        return True, ""
    if route.accept_synthetic_quality:
        return True, (
            f"quality figures of {', '.join(synthetic)} were measured on synthetic data; "
            "routed on them anyway (accept_synthetic_quality: true)"
        )
    return False, (
        f"model {model.name!r}: quality figures of {', '.join(synthetic)} were measured on "
        f"synthetic data (not evidence), so the policy serves {model.precisions()[0]}; "
        "rebuild with --eval-data DIR or set accept_synthetic_quality: true in the routing file"
    )
