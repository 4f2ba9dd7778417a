"""How much one oversized HTTP JSON body costs everyone else (issue 13, item 1).

``python -m lab.floors.http_stall --repository model_repository`` starts the gateway, probes
``/v2/health/ready`` every 10 ms from a thread and reports, for each case, the slowest probe
while the case ran, the case's own answer and the gateway's RSS:

* ``digits-60mb``: 60 MB of JSON for ``digits`` (``image`` [-1, 1, 32, 32]): rejected from its
  Content-Length before the body is parsed;
* ``rejected-x50``: fifty of those in a row (RSS must come back near its baseline);
* ``minilm-9mb``: a 9 MB JSON body that is within bounds (``minilm`` has a dynamic sequence
  dimension), parsed on a worker thread, then rejected for its datatype (FP32, not INT64), so
  what is measured is the parse, not an engine run over a million tokens;
* ``minilm-4mb-x20``: twenty such 4.5 MB bodies sent at once from twenty connections.

Numbers go in docs/gateway.md ("Hardening"), not in tests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path

from server.runtime.runner import GatewayProcess


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Prober:
    """GET /v2/health/ready in a loop; ``worst(since)`` is the slowest probe after ``since``."""

    def __init__(self, http_url: str) -> None:
        self.url = http_url
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.url, timeout=60)
        while not self._stop.is_set():
            start = time.monotonic()
            conn.request("GET", "/v2/health/ready")
            conn.getresponse().read()
            self.samples.append((start, time.monotonic() - start))
            time.sleep(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def worst(self, since: float) -> float:
        return max((s for t, s in self.samples if t >= since), default=0.0)


def _post(http_url: str, model: str, body: bytes) -> tuple[int, str, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection(http_url, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    return resp.status, text[:160], time.monotonic() - start


def _concurrently(http_url: str, model: str, bodies: list[bytes]) -> list[tuple[int, str, float]]:
    answers: list[tuple[int, str, float]] = []
    threads = [
        threading.Thread(target=lambda b=b: answers.append(_post(http_url, model, b)))
        for b in bodies
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return answers


def _digits_body(size: int) -> bytes:
    head = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": ['
    return head + b"0.5, " * ((size - len(head)) // 5) + b"0.5]}]}"


def _minilm_body(tokens: int) -> bytes:
    ids = ", ".join(["1"] * tokens)
    inputs = [
        f'{{"name": "{n}", "datatype": "FP32", "shape": [1, {tokens}], "data": [{ids}]}}'
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    return f'{{"inputs": [{", ".join(inputs)}]}}'.encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    args = p.parse_args(argv)
    results = []
    with (
        GatewayProcess(args.repository, ["--upstream", "embedded?threads=1"]) as gw,
        Prober(gw.http_url) as probe,
    ):
        time.sleep(0.5)
        baseline = _rss_mb(gw.pid)
        cases = [
            ("digits-60mb", "digits", [_digits_body(60_000_000)]),
            ("rejected-x50", "digits", [_digits_body(60_000_000)] * 50),
            ("minilm-9mb", "minilm", [_minilm_body(1_000_000)]),
        ]
        cases.append(("minilm-4mb-x20", "minilm", [_minilm_body(500_000)] * 20))
        for name, model, bodies in cases:
            since = time.monotonic()
            if name.endswith("x20"):  # concurrently
                answers = _concurrently(gw.http_url, model, bodies)
            else:
                answers = [_post(gw.http_url, model, b) for b in bodies]
            status, text, seconds = answers[-1]
            results.append(
                {
                    "case": name,
                    "body_mb": round(len(bodies[0]) / 1e6, 1),
                    "requests": len(bodies),
                    "status": status,
                    "answer_s": round(seconds, 3),
                    "worst_health_probe_ms": round(probe.worst(since) * 1000, 1),
                    "rss_mb": round(_rss_mb(gw.pid), 1),
                    "rss_baseline_mb": round(baseline, 1),
                    "answer": text,
                }
            )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
