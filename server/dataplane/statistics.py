"""Triton's ModelStatistics from the gateway's per-variant counters, for gRPC and HTTP.

Entries follow Triton's shape: one per (name, version). A variant has its own entry; a logical
model (``digits``) has one entry, version "1", whose counts are the sums over its variants (so
``len(model_stats) == 1`` holds, as client code expects of Triton). Without a name: every
variant and every logical model.

Durations: the gateway times a whole request (routing, queueing and the engine or Triton call)
and reports that time as ``compute_infer``; ``queue``, ``compute_input`` and ``compute_output``
carry the same counts with zero time (the per-stage split is in the Prometheus histograms
``precision_serve_queue_duration_seconds`` / ``upstream_duration_seconds``). perf_analyzer reads
the queue count to find which version was measured, so it must be the success count.
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2 as pb

from server.dataplane.gateway import VariantStats, combined

VERSION = "1"


def _durations(s: VariantStats) -> dict[str, tuple[int, int]]:
    n = s.success_count
    return {
        "success": (n, s.success_ns),
        "fail": (s.fail_count, s.fail_ns),
        "queue": (n, 0),
        "compute_input": (n, 0),
        "compute_infer": (n, s.success_ns),
        "compute_output": (n, 0),
    }


def to_proto(name: str, s: VariantStats) -> pb.ModelStatistics:
    infer = pb.InferStatistics(
        **{k: pb.StatisticDuration(count=c, ns=ns) for k, (c, ns) in _durations(s).items()}
    )
    return pb.ModelStatistics(
        name=name,
        version=VERSION,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=infer,
    )


def to_json(name: str, s: VariantStats) -> dict[str, Any]:
    """Triton's HTTP form (numbers as JSON numbers, not protobuf-JSON strings)."""
    return {
        "name": name,
        "version": VERSION,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {k: {"count": c, "ns": ns} for k, (c, ns) in _durations(s).items()},
        "batch_stats": [],
    }


__all__ = ["VERSION", "combined", "to_json", "to_proto"]
