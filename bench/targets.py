"""The issue targets, each judged met / not met from one run's results, with the reason when
the host cannot reach it. The precision targets depend on the host's CPU class
(:func:`bench.machine.cpu_class`); the serving targets are the same everywhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.engine_level import best_served, recheck
from bench.machine import cpu_class
from bench.serving import PATH_NAMES

MINILM_MIN_COSINE = 0.999
ENGINE_FLAG_RATIO = 1.2  # a non-served engine this much faster than the served one is flagged


@dataclass(frozen=True)
class PrecisionTargets:
    """Minimum speed-ups over ONNX Runtime FP32 at the headline batch; ``None``: no bar, the
    fastest variant at cosine >= MINILM_MIN_COSINE is named with its ratio."""

    resnet50: float
    minilm: float | None


# Set on Sapphire Rapids (AMX, AVX512-VNNI/BF16) and on AMD EPYC (AVX2, no VNNI). The issue
# sets none for AVX512 without AMX: the AVX2 floor applies there.
PRECISION_TARGETS = {
    "intel-amx": PrecisionTargets(resnet50=5.0, minilm=2.5),
    "avx512": PrecisionTargets(resnet50=1.9, minilm=None),
    "avx2": PrecisionTargets(resnet50=1.9, minilm=None),
}


def targets_for(machine: dict[str, Any]) -> PrecisionTargets:
    cls = machine.get("cpu_class") or cpu_class(machine.get("isa_flags", []))
    return PRECISION_TARGETS.get(cls, PRECISION_TARGETS["avx2"])


def _row(
    name: str, target: str, measured: float | None, ok: bool | None, how: str, why: str = ""
) -> dict[str, Any]:
    status = "not measured" if ok is None else ("met" if ok else "not met")
    if ok is not None and target == "named":
        status = "named"
    return {
        "target": name,
        "wanted": target,
        "measured": measured,
        "status": status,
        "how": how,
        "why": "" if ok else why,
    }


def _host_why(machine: dict[str, Any], kind: str) -> str:
    flags = set(machine.get("isa_flags", []))
    if kind == "int8" and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return (
            "this CPU has no VNNI or AMX-INT8: ONNX Runtime's U8xS8 kernels run on AVX2 "
            "(vpmaddubsw, 7-bit weights via reduce_range), so INT8 buys far less than on the "
            "Sapphire Rapids host the AMX target was set on"
        )
    if kind == "bf16" and not flags & {"amx_bf16", "avx512_bf16"}:
        return (
            "this CPU has no AMX-BF16/AVX512-BF16, so the builder skips the bf16 variant "
            "(the AMX target's ~3x rests on OpenVINO BF16 on AMX); the best variant here is "
            "INT8 dynamic, whose cosine is below 0.999"
        )
    return ""


def _ratio(res: dict[str, Any], best: dict[str, Any] | None) -> float | None:
    b = str(res["headline_batch"])
    return best["ratio_to_ort_fp32"][b] if best and "ratio_to_ort_fp32" in best else None


def _resnet(res: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    want = targets_for(machine).resnet50
    best = best_served(res)
    ratio = _ratio(res, best)
    how = f"best served variant: {best['precision']} on {_on(best)}" if best else "-"
    return _row(
        f"ResNet-50 best served variant vs ONNX Runtime FP32, batch {res['headline_batch']}",
        f">= {want}x",
        ratio,
        None if ratio is None else ratio >= want,
        how,
        _host_why(machine, "int8"),
    )


def _minilm(mini: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    want = targets_for(machine).minilm
    best = best_served(mini, MINILM_MIN_COSINE)
    ratio = _ratio(mini, best)
    fastest = best_served(mini)
    how = (
        f"{'best' if want else 'fastest'} served variant with cosine >= {MINILM_MIN_COSINE}: "
        f"{best['precision']} on {_on(best)}"
        if best
        else "-"
    )
    if fastest and fastest is not best:
        cos = fastest["manifest_quality"].get("cosine_mean")
        how += f"; fastest overall: {fastest['precision']} {_ratio(mini, fastest)}x"
        how += f" at cosine {cos:.4f}" if cos is not None else ""
    ok = None if ratio is None else (True if want is None else ratio >= want)
    return _row(
        f"MiniLM best served variant (cosine >= {MINILM_MIN_COSINE}) vs ORT FP32, "
        f"batch {mini['headline_batch']} seq 128",
        f">= {want}x" if want else "named",
        ratio,
        ok,
        how,
        _host_why(machine, "bf16"),
    )


def _on(row: dict[str, Any]) -> str:
    """The engine of a contender judged as served, saying when the re-check moved it there."""
    return row["engine"] + ("" if row["served"] else " (after the engine re-check)")


def engine_flags(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant whose fastest non-served engine measured more than
    ENGINE_FLAG_RATIO x its served engine at the headline batch, in this run."""
    out = []
    for model, res in results.get("engine_level", {}).items():
        if not isinstance(res, dict) or "error" in res or "headline_batch" not in res:
            continue
        b = str(res["headline_batch"])
        for precision, e in recheck(res).items():
            if e["ratio"] is None or e["ratio"] <= ENGINE_FLAG_RATIO:
                continue
            served, other, after = e["served"], e["other"], e["after"]
            moved = after is not served
            lead = e["lead"]
            row = _row(
                f"{model} {precision}: served engine within {ENGINE_FLAG_RATIO}x of the fastest "
                f"engine, batch {b}",
                f"<= {ENGINE_FLAG_RATIO}x",
                e["ratio"],
                False,
                f"{other['engine']} {other['throughput'][b]:g} items/s vs served "
                f"{served['engine']} {served['throughput'][b]:g}; the start-up re-check "
                + (f"serves {after['engine']}" if moved else f"keeps {served['engine']}")
                + f" (lead {100 * lead['lead']:+.0f}%, "
                + (
                    f"spread {100 * lead['noise']:.0f}%)"
                    if e["per_round"]
                    else "no per-round figures saved: spread taken as 0)"
                ),
                "the builder's engine choice disagrees with this run: "
                + (
                    "its timing was noisy or the host differs; the precision targets are judged "
                    "on the re-checked engine"
                    if moved
                    else "the lead is within this run's spread too, so the re-check keeps the "
                    "served engine and the targets are judged on it"
                ),
            )
            row["status"] = "flagged"
            out.append(row)
    return out


def precision_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    machine = results.get("machine", {})
    engine = results.get("engine_level", {})
    out = []
    if engine.get("resnet50") and "error" not in engine["resnet50"]:
        out.append(_resnet(engine["resnet50"], machine))
    if engine.get("minilm") and "error" not in engine["minilm"]:
        out.append(_minilm(engine["minilm"], machine))
    return out


def _get(serving: dict[str, Any], variant: str, path: str, c: int, key: str) -> Any:
    paths = serving.get("variants", {}).get(variant, {}).get("paths", {})
    return paths.get(path, {}).get(str(c), {}).get(key)


# (serving results, path) -> the figure judged for that path
Measure = Callable[[dict[str, Any], str], "float | None"]


def _over(variant: str, den: str, c: int, key: str = "rps") -> Measure:
    """``path`` over ``den`` (a ratio of ``key``) for ``variant`` at concurrency ``c``."""

    def measure(s: dict[str, Any], path: str) -> float | None:
        a, b = _get(s, variant, path, c, key), _get(s, variant, den, c, key)
        return round(a / b, 3) if a and b else None

    return measure


def _added(variant: str, den: str) -> Measure:
    """p50 at concurrency 1 of ``path`` minus ``den``'s, in ms."""

    def measure(s: dict[str, Any], path: str) -> float | None:
        a, b = _get(s, variant, path, 1, "p50_ms"), _get(s, variant, den, 1, "p50_ms")
        return round(a - b, 3) if a is not None and b is not None else None

    return measure


# The bare servers (lab.floors.bare_server): the same engine behind nothing but parse-run-reply
# (no batching), on grpc.aio and on grpc's sync server; the bare forwarder for the Triton path.
EMBEDDED_FLOORS = ("bare_aio", "bare_sync")
FORWARD_FLOORS = ("bare_forward", "bare_forward_http")


@dataclass(frozen=True)
class ServingTarget:
    name: str
    wanted: str
    how: str
    subject: str  # the path judged
    measure: Measure
    ok: Callable[[float], bool]
    why: Callable[[dict[str, Any]], str]
    floors: tuple[str, ...] = ()  # bare paths measured the same way (lab.floors.bare_server)


def _profile_why(path: str) -> Callable[[dict[str, Any]], str]:
    def why(s: dict[str, Any]) -> str:
        prof = (s.get("py_spy") or {}).get(path) or {}
        top = prof.get("top_own") or []
        if not top:
            return "no py-spy profile of this path in this run (section 4)"
        lead = ", ".join(f"{e['function']} {100 * e['share']:.0f} %" for e in top[:3])
        return f"py-spy of the {path} process at c16: most samples in {lead} (section 4)"

    return why


def floor_note(t: ServingTarget, serving: dict[str, Any]) -> str:
    """What the bare servers reach on the same measure: whether any handler on that framework
    could meet the target on this host, or the gateway's own work is what misses it."""
    got = {p: t.measure(serving, p) for p in t.floors}
    got = {p: v for p, v in got.items() if v is not None}
    if not got:
        return ""
    figures = ", ".join(f"{PATH_NAMES[p][0]} {v:g}" for p, v in got.items())
    if any(t.ok(v) for v in got.values()):
        return (
            f"the bare servers measured the same way: {figures}: the gateway's own work misses it"
        )
    return (
        f"the bare servers measured the same way: {figures}: none meets it either, so no "
        "handler on these gRPC servers does on this host"
        + (" without batching" if t.floors == EMBEDDED_FLOORS else "")
    )


SERVING_TARGETS = (
    ServingTarget(
        "gateway (embedded) / KServe ModelServer throughput, digits INT8, concurrency 4",
        ">= 1.5x", "(b)/(f)", "gateway", _over("digits_int8", "kserve", 4),
        lambda v: v >= 1.5, _profile_why("gateway"), EMBEDDED_FLOORS,
    ),
    ServingTarget(
        "gateway (embedded) / KServe ModelServer throughput, digits INT8, concurrency 16",
        ">= 1.5x", "(b)/(f)", "gateway", _over("digits_int8", "kserve", 16),
        lambda v: v >= 1.5, _profile_why("gateway"), EMBEDDED_FLOORS,
    ),
    ServingTarget(
        "gateway (embedded) / Triton direct throughput, digits INT8, concurrency 16",
        ">= 1.0x", "(b)/(c)", "gateway", _over("digits_int8", "triton", 16),
        lambda v: v >= 1.0, _profile_why("gateway"), EMBEDDED_FLOORS,
    ),
    ServingTarget(
        "gateway -> Triton / Triton direct throughput, digits INT8, concurrency 16",
        ">= 0.7x", "(d)/(c)", "gateway_triton", _over("digits_int8", "triton", 16),
        lambda v: v >= 0.7, _profile_why("gateway_triton"), FORWARD_FLOORS,
    ),
    ServingTarget(
        "gateway -> Triton CPU per forwarded request / echo server CPU per request, "
        "digits INT8, concurrency 16",
        "<= 1.2x", "server CPU ms/req (d)/(e)", "gateway_triton",
        _over("digits_int8", "echo", 16, "server_cpu_ms_per_request"),
        lambda v: v <= 1.2, _profile_why("gateway_triton"), FORWARD_FLOORS,
    ),
    ServingTarget(
        "gateway, Envoy front -> Triton / Triton direct throughput, digits INT8, concurrency 16",
        ">= 0.8x", "(l)/(c)", "gateway_envoy", _over("digits_int8", "triton", 16),
        lambda v: v >= 0.8, lambda s: _why_envoy(s, "digits_int8"),
    ),
    ServingTarget(
        "gateway, Envoy front -> Triton / Triton direct throughput, digits INT8, concurrency 4",
        ">= 0.7x", "(l)/(c)", "gateway_envoy", _over("digits_int8", "triton", 4),
        lambda v: v >= 0.7, lambda s: _why_envoy(s, "digits_int8"),
    ),
    ServingTarget(
        "gateway, Envoy front: CPU per forwarded request / the Python front's, digits INT8, "
        "concurrency 16",
        "<= 0.4x", "server CPU ms/req (l)/(d)", "gateway_envoy",
        _over("digits_int8", "gateway_triton", 16, "server_cpu_ms_per_request"),
        lambda v: v <= 0.4, lambda s: _why_envoy(s, "digits_int8"),
    ),
    ServingTarget(
        "gateway, Envoy front -> Triton adds at p50 over Triton direct, digits INT8, "
        "concurrency 1",
        "<= 1.0 ms", "(l) - (c)", "gateway_envoy", _added("digits_int8", "triton"),
        lambda v: v <= 1.0, lambda s: _why_envoy(s, "digits_int8"),
    ),
    ServingTarget(
        "gateway (embedded) / in-process throughput, resnet50 INT8, concurrency 4",
        ">= 0.95x", "(b)/(a)", "gateway", _over("resnet50_int8", "inprocess", 4),
        lambda v: v >= 0.95, lambda s: _why_batching(s, "resnet50_int8"), EMBEDDED_FLOORS,
    ),
    ServingTarget(
        "gateway adds at p50 over in-process, digits INT8, concurrency 1",
        "<= 1.0 ms", "(b) - (a)", "gateway", _added("digits_int8", "inprocess"),
        lambda v: v <= 1.0, lambda s: _why_gateway(s, "digits_int8"), EMBEDDED_FLOORS,
    ),
    ServingTarget(
        "gateway -> Triton adds at p50 over Triton direct, digits INT8, concurrency 1",
        "<= 1.0 ms", "(d) - (c)", "gateway_triton", _added("digits_int8", "triton"),
        lambda v: v <= 1.0, lambda s: _why_hop(s, "digits_int8"), FORWARD_FLOORS,
    ),
)  # fmt: skip


def serving_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    serving = results.get("serving", {})
    out = []
    for t in SERVING_TARGETS:
        v = t.measure(serving, t.subject)
        ok = None if v is None else t.ok(v)
        why = (
            "; ".join(x for x in (t.why(serving), floor_note(t, serving)) if x)
            if ok is False
            else ""
        )
        out.append(_row(t.name, t.wanted, v, ok, t.how, why))
    return out


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    return precision_rows(results) + engine_flags(results) + serving_rows(results)


def _p50(serving: dict[str, Any], variant: str, path: str) -> float | None:
    return _get(serving, variant, path, 1, "p50_ms")


def _ms(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f} ms"


def _why_batching(serving: dict[str, Any], variant: str) -> str:
    b = (serving.get("gateway_c4_breakdown") or {}).get(variant)
    if not b:
        return ""
    g = b["gateway"]
    return (
        f"at c4 the gateway ran {g.get('batch_rows_mean')} rows per engine call "
        f"({_ms(g.get('upstream_ms_mean'))} each, {_ms(g.get('queue_ms_mean'))} waiting per "
        "request): one engine call at a time per instance, where in-process the 4 callers "
        "run the session concurrently (section 4)"
    )


def _why_gateway(serving: dict[str, Any], variant: str) -> str:
    echo = _p50(serving, variant, "echo")
    b = serving.get("gateway_breakdown") or {}
    g = b.get("gateway", {})
    return (
        f"a bare Python gRPC echo alone takes {_ms(echo)} at p50 on this loaded host; inside the "
        f"gateway a request spends {_ms(g.get('request_ms_mean'))} (engine "
        f"{_ms(g.get('upstream_ms_mean'))}, batch wait {_ms(g.get('queue_ms_mean'))}), the rest "
        "is gRPC transport and grpc.aio's handling around the handler (section 4)"
    )


def _why_envoy(serving: dict[str, Any], variant: str) -> str:
    cpu = {c: _get(serving, variant, "gateway_envoy", c, "server_cpu_ms_per_request")
           for c in (1, 16)}  # fmt: skip
    return (
        f"the Envoy front's process tree spends {_ms(cpu[1])} of CPU per request at c1 and "
        f"{_ms(cpu[16])} at c16, on the same 2 cores as the client and Triton; where Envoy's "
        "time goes: docs/lab/envoy-front.md"
    )


def _why_hop(serving: dict[str, Any], variant: str) -> str:
    echo = _p50(serving, variant, "echo")
    g = (serving.get("gateway_triton_breakdown") or {}).get("gateway", {})
    return (
        f"a second Python gRPC hop: the echo floor is {_ms(echo)} at p50 here, and the gateway "
        f"itself spends {_ms(g.get('request_ms_mean'))} per request, of which the call to "
        f"Triton {_ms(g.get('upstream_ms_mean'))} (section 4)"
    )
