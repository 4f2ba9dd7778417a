"""``soak.md``: the soak report for people (the same figures as ``soak.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab.soak.report import to_jsonable


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _big_rate(interval_s: float) -> str:
    return f"one 60 MB request every {interval_s:.0f} s" if interval_s > 0 else "no 60 MB request"


def _header(r: dict[str, Any]) -> list[str]:
    m, o = r["machine"], r["options"]
    verdict = "PASSED" if r["passed"] else "FAILED"
    return [
        f"# Soak: {o['model']} on the {o['upstream']} upstream"
        + (f" (front {o['front']})" if o["upstream"] == "triton" and o.get("front") else "")
        + f", {o['minutes']} min: {verdict}",
        "",
        f"Machine: {m.get('hostname')} ({m.get('model')}, {m.get('cores')} cores, "
        f"flags {', '.join(m.get('flags', []))}); load average at the start "
        f"{m.get('load_average')}, at the end {m.get('load_average_end')}. The soak client "
        "runs on the same host as the gateway.",
        "",
        *([o["note"], ""] if o.get("note") else []),
        f"Capacity (closed loop, {r['capacity']['concurrency']} clients, "
        f"{r['capacity']['seconds']:.0f} s): {r['capacity']['requests_per_s']} requests/s; "
        f"paced at {o['load'] * 100:.0f} %: {r['rate']} requests/s for {o['minutes']} min, "
        f"{o['attack_fraction'] * 100:.0f} % of slots malformed, "
        f"{o['cancel_fraction'] * 100:.0f} % cancelled, {_big_rate(o['big_interval_s'])}, "
        f"{o['slow_clients']} slow clients.",
        "",
    ]


def _checks(r: dict[str, Any]) -> list[str]:
    rows = [
        (c["name"], c["value"], c["limit"], "pass" if c["passed"] else "**FAIL**")
        for c in r["checks"]
    ]
    return ["## Must show", "", *_table(("check", "measured", "limit", ""), rows)]


def _valid(r: dict[str, Any]) -> list[str]:
    v = r["valid"]
    lines = [
        "## Valid requests",
        "",
        f"{v['sent']} sent, {v['ok']} answered correctly, {v['errors']} errors outside a "
        f"killed replica's in-flight window, {v['killed_window_errors']} in flight on the killed "
        f"replica, {v['skipped']} not sent (client in-flight cap). Errors by kind: "
        f"{v['errors_by_kind'] or 'none'}.",
        "",
    ]
    rows = [
        (p, d["sent"], d["ok"], d["throughput"], d["p50_ms"], d["p99_ms"])
        for p, d in v["per_precision"].items()
    ]
    lines += _table(("precision", "sent", "ok", "answered/s", "p50 ms", "p99 ms"), rows)
    rows = [
        (f"{w['t']:.0f}", w["requests"], w["errors"], w["p50_ms"], w["p99_ms"])
        for w in r["windows"]
    ]
    return [
        *lines,
        "Per 10 s window (by start time):",
        "",
        *_table(("t (s)", "requests", "errors", "p50 ms", "p99 ms"), rows),
    ]


def _attacks(r: dict[str, Any]) -> list[str]:
    m, c, s = r["malformed"], r["cancellations"], r["slow_clients"]
    lines = [
        "## Hostile traffic",
        "",
        f"Malformed (small): {m['sent']} sent, {m['unexpected']} answered with something "
        "other than the client error the protocol expects.",
        "",
    ]
    lines += _table(("kind", "answers"), [(k, v) for k, v in m["by_kind"].items()])
    big = [(o["kind"], f"{o['t']:.0f}", f"{o['seconds']:.2f}", o["status"]) for o in r["oversized"]]
    lines += [
        "60 MB requests during the soak:",
        "",
        *_table(("kind", "t (s)", "answered after (s)", "status"), big),
    ]
    lines += [
        f"Cancellations: {c['sent']} sent; {c['cancelled']} cancelled, {c['deadline']} deadline "
        f"exceeded, {c['completed']} answered first, other {c['other'] or 'none'}.",
        "",
        f"Slow clients: {s['started']} partial-body connections; the server closed "
        f"{s['server_closed']}, answered {s['server_answered'] or 'none'}, "
        f"{s['client_gave_up']} were still open when the client gave up.",
        "",
    ]
    return lines


def _probes(r: dict[str, Any]) -> list[str]:
    rows = [
        (
            p["probe"],
            p["big"],
            p["count"],
            p["errors"],
            p["p50_ms"],
            p["max_ms"],
            p["big_seconds"],
            p["big_status"],
        )
        for p in r["in_flight"]
    ]
    b = r["rejected_big"]
    return [
        "## While a 60 MB request is in flight",
        "",
        *_table(
            (
                "probe",
                "60 MB request",
                "probes",
                "failed",
                "p50 ms",
                "max ms",
                "60 MB answered after (s)",
                "its status",
            ),
            rows,
        ),
        "## Rejected 60 MB requests and memory",
        "",
        f"{b['answered']}/{b['asked']} sent in {b['seconds']} s (budget {b['budget_s']} s): "
        f"RSS {b['baseline_mb']} MB before, {b['peak_mb']} MB at most, {b['after_mb']} MB 2 s "
        f"after the last ({b['rss_delta_mb']:+} MB). Answers: {b['statuses']}.",
        "",
    ]


def _resources(r: dict[str, Any]) -> list[str]:
    g, t = r["growth"], r["triton"]
    lines = ["## Gateway resources", ""]
    if g:
        lines += [
            f"After warm-up (from t={r['warmup_end']:.0f} s of the sampler's clock): RSS "
            f"{g['rss_first_mb']} -> {g['rss_last_mb']} MB ({g['rss_growth_pct']:+} %), "
            f"open fds {g['fds_first']} -> {g['fds_last']} ({g['samples']} samples).",
            "",
        ]
    lines += [f"Phases (sampler clock, s): {r['phases']}.", ""]
    if t:
        lines += [
            f"Triton: replica {t.get('killed')} killed at {t.get('killed_at')} s, "
            f"restarted at {t.get('restarted_at', t.get('restart_error'))}; it served "
            f"{t.get('restarted_replica_successes', 'n/a')} requests after the restart"
            + (
                f" (its statistics could not be read at the end: {t['restarted_replica_error']})"
                if "restarted_replica_error" in t
                else ""
            )
            + ".",
            "",
        ]
    lines += [
        f"A valid request after everything: {r['final_request']}; gateway exit code on "
        f"SIGTERM: {r['gateway_exit_code']}.",
        "",
    ]
    return lines


def render(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    r = to_jsonable(report)
    lines = _header(r) + _checks(r) + _valid(r) + _attacks(r) + _probes(r) + _resources(r)
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, report: dict[str, Any], plots: Sequence[str] = ()) -> Path:
    path.write_text(render(report, plots))
    return path
