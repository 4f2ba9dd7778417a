"""Markdown for the peers (nothing here measures): the serving paths beside the gateway as
ratios, perf_analyzer's figures over the same paths, and py-spy's profiles."""

from __future__ import annotations

from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


PEER_RATIOS = (
    ("(b)/(f) gateway / KServe", "gateway", "kserve"),
    ("(b)/(c) gateway / Triton direct", "gateway", "triton"),
    ("(d)/(c) gateway -> Triton / Triton direct", "gateway_triton", "triton"),
    ("(l)/(c) gateway, Envoy front -> Triton / Triton direct", "gateway_envoy", "triton"),
    ("(l)/(d) gateway, Envoy front / Python front", "gateway_envoy", "gateway_triton"),
    ("(g)/(b) gateway --workers 2 / gateway", "gateway_workers2", "gateway"),
    ("(h)/(f) bare grpc.aio server / KServe", "bare_aio", "kserve"),
    ("(h)/(c) bare grpc.aio server / Triton direct", "bare_aio", "triton"),
    ("(i)/(c) bare grpc sync server / Triton direct", "bare_sync", "triton"),
    ("(b)/(h) gateway / bare grpc.aio server", "gateway", "bare_aio"),
    ("(j)/(c) bare forwarder -> Triton / Triton direct", "bare_forward", "triton"),
    ("(d)/(j) gateway -> Triton / bare forwarder", "gateway_triton", "bare_forward"),
    ("(k)/(c) bare HTTP forwarder -> Triton / Triton direct", "bare_forward_http", "triton"),
)


def peer_ratios(variant: dict[str, Any], concurrencies: list[str]) -> list[str]:
    """Throughput ratios between paths of one variant, per concurrency (bench client)."""
    paths = variant["paths"]
    body = []
    for label, num, den in PEER_RATIOS:
        cells = []
        for c in concurrencies:
            a = paths.get(num, {}).get(c, {}).get("rps")
            b = paths.get(den, {}).get(c, {}).get("rps")
            cells.append(_f(a / b, 3) if a and b else "—")
        body.append([label, *cells])
    return [*_table(["throughput ratio", *[f"c{c}" for c in concurrencies]], body), ""]


def perf_analyzer_section(pa: dict[str, Any] | None) -> list[str]:
    if not pa:
        return []
    lines = ["### perf_analyzer over the same paths", ""]
    if "error" in pa:
        return [*lines, f"perf_analyzer did not run: {pa['error']}", ""]
    lines += [
        "NVIDIA's perf_analyzer (the C++ client from the tritonclient 2.40.0 wheel, synchronous "
        "gRPC calls, `-s 100` stability, `-s 400` where that never settled) against "
        f"`{pa['variant']}`, one run per path and concurrency, from its CSV; latencies in ms.",
        "",
    ]
    body = []
    for path, per in pa["paths"].items():
        for c, r in per.items():
            if "error" in r:
                body.append([path, c, "—", "—", "—", "—", r["error"][:200]])
                continue
            body.append(
                [path, c, _f(r["rps"], 1), _f(r.get("p50_ms")), _f(r.get("p99_ms")),
                 str(r.get("stability_percent", "")), ""]
            )  # fmt: skip
    header = ["path", "concurrency", "req/s", "p50", "p99", "-s %", "error"]
    return [*lines, *_table(header, body), ""]


def pyspy_section(spy: dict[str, Any] | None) -> list[str]:
    if not spy:
        return []
    lines = ["**py-spy** (sampling the serving process while the bench client loads it):", ""]
    for path, p in spy.items():
        if "error" in p:
            lines += [f"- `{path}`: {p['error']}", ""]
            continue
        client = p.get("client") or {}
        own = [[f"`{e['function'][:100]}`", f"{100 * e['share']:.1f} %"] for e in p["top_own"][:8]]
        cum = [
            [f"`{e['function'][:100]}`", f"{100 * e['share']:.1f} %"]
            for e in p["top_cumulative"][:8]
        ]
        lines += [
            f"`{path}` at concurrency {p['concurrency']} ({_f(client.get('rps'), 0)} req/s during "
            f"the profile), {p['samples']} samples of its busy threads. By own samples:",
            "",
            *_table(["function (file:line)", "share"], own),
            "",
            "By cumulative samples:",
            "",
            *_table(["function (file:line)", "share"], cum),
            "",
        ]
    return lines
