"""The ``slo`` policy through the Envoy front against a real Triton (issue 34, "slo shifting
weights under a ramp"): Envoy serves the model, the gateway's control loop reads Envoy's stats
(server/front/slo.py), and the controller's mix comes back as Envoy's runtime weights.

``tiny_fp32`` is made a slow rung with a fixed capacity (tests/triton/slow_model.py: 25 ms per
request, 40 requests/s, no CPU), ``tiny_int8`` stays fast. An open-loop ramp sends 10 requests/s
(fp32 keeps up), then 80 (twice its capacity: its queue grows), then 5. Assertions are about
direction only: weights and served precisions move towards int8 under the overload and back
towards fp32 when the load falls."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import yaml

import server.launcher.tritonserver as tritonserver
from common.model_repository import LABELLED, load_manifests
from common.process import wait_ready
from server.runtime.runner import GatewayProcess
from tests.triton import slow_model
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration
X = np.random.default_rng(7).normal(size=(2, 16)).astype(np.float32)
FP32_SHARE = "ps.split.tiny.0"  # the first route's cumulative percent: fp32 (most accurate first)
SLO = {
    "p99_ms": 300,  # fp32 alone: ~30 ms under the low load; far over it once its queue grows
    "accuracy_budget": 1.0,  # int8 (loss 0.5) may take all of the traffic
    "window_ms": 250,  # a window per reading of Envoy's stats (server/front/slo.py POLL_S)
    "window_requests": 100,
    "up_windows": 1,
    "down_windows": 2,
    "step": 0.25,
}


def _repository(src: Path, dst: Path) -> Path:
    """A copy of the tiny repository without fp16 (one Triton model fewer to start) whose
    manifest says fp32 is the slow, exact rung and int8 the fast one."""
    shutil.copytree(src, dst)
    manifest = load_manifests(dst)["tiny"]
    del manifest.variants["fp16"]
    shutil.rmtree(dst / "tiny_fp16")
    speed = {"fp32": 25.0, "int8": 2.0}
    loss = {"fp32": 0.0, "int8": 0.5}
    for precision, variant in manifest.variants.items():
        variant.speed = {"latency_ms_p50": speed[precision]}
        variant.details["accuracy_loss"] = loss[precision]
        variant.quality_source = LABELLED
    manifest.save(dst)
    return dst


def _slow_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's derived ``tiny_fp32`` runs tests/triton/slow_model.py instead of the launcher's
    model (same engine and answers, plus the sleep)."""
    derive = tritonserver.derive_repository

    def derive_slow(repository: Path, target: Path, threads: int = 1):
        models = derive(repository, target, threads)
        shutil.copy2(slow_model.__file__, Path(target) / "tiny_fp32" / "1" / "model.py")
        return models

    monkeypatch.setattr(tritonserver, "derive_repository", derive_slow)


def _input(module: Any) -> Any:
    t = module.InferInput("x", list(X.shape), "FP32")
    t.set_data_from_numpy(X)
    return t


def _admin(gw: GatewayProcess, path: str) -> dict:
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}{path}"
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def _fp32_percent(gw: GatewayProcess) -> int:
    """fp32's share of first attempts in Envoy now (the runtime key; 100 until first set)."""
    entry = _admin(gw, "/runtime")["entries"].get(FP32_SHARE)
    return int(entry["final_value"]) if entry else 100


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float | None:
    """A sample of the gateway's /metrics (None: no such series)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return None


async def _ramp(
    url: str, phases: list[tuple[float, float]], on_phase: Callable[[int], None]
) -> list[tuple[int, float, str]]:
    """Open-loop load: for each (requests/s, seconds) phase, requests sent at that rate whether
    or not earlier ones have answered; returns (phase, sent at, precision served) per reply.
    ``on_phase(i)`` runs (in a thread) when phase ``i`` ends."""
    client = aioclient.InferenceServerClient(url)
    inp = _input(aioclient)
    replies: list[tuple[int, float, str]] = []

    async def one(phase: int) -> None:
        sent = time.monotonic()
        result = await client.infer("tiny", [inp], client_timeout=30)
        replies.append((phase, sent, result.get_response().parameters["precision"].string_param))

    tasks = []
    for i, (rate, seconds) in enumerate(phases):
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) < start + seconds:
            due = start + n / rate
            if now >= due:
                tasks.append(asyncio.create_task(one(i)))
                n += 1
            else:
                await asyncio.sleep(due - now)
        await asyncio.to_thread(on_phase, i)
    await asyncio.gather(*tasks)
    await client.close()
    return replies


def test_slo_shifts_envoys_weights_under_a_ramp_and_back(
    tiny_repository: Path,
    start_triton: StartTriton,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = _repository(tiny_repository, tmp_path / "repo")
    _slow_fp32(monkeypatch)
    triton = start_triton(repo)
    with grpcclient.InferenceServerClient(triton.grpc_url) as direct:  # first runs are slow
        for variant in ("tiny_fp32", "tiny_int8") * 3:
            direct.infer(variant, [_input(grpcclient)])
    routing = tmp_path / "routing.yaml"
    routing.write_text(yaml.safe_dump({"models": {"tiny": {"policy": "slo", "slo": SLO}}}))
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", "--routing", str(routing)]
    args += ["--log-level", "info"]  # the controller's shifts in the log (the failure context)
    with GatewayProcess(repo, extra_args=args) as gw:
        seen: list[int] = []  # fp32's percent in Envoy at the end of each phase
        phases = [(10.0, 3.0), (80.0, 4.0), (5.0, 6.0)]
        replies = asyncio.run(_ramp(gw.grpc_url, phases, lambda i: seen.append(_fp32_percent(gw))))
        # the exported mix is the one in Envoy (read until both agree: a shift may fall between)
        wait_ready(
            lambda: (
                _metric(gw, "precision_serve_slo_share", precision="int8")
                == pytest.approx(1 - _fp32_percent(gw) / 100, abs=0.011)
            ),
            5,
            "the exported slo share equal to Envoy's weight",
        )
        shifts = {
            d: _metric(gw, "precision_serve_slo_shifts_total", direction=d) for d in ("up", "down")
        }
        log = gw.log()

    def int8_fraction(phase: int, last_s: float) -> float:
        """int8's share of the replies to requests sent in the last ``last_s`` of ``phase``."""
        end = max(sent for p, sent, _ in replies if p == phase)
        served = [prec for p, sent, prec in replies if p == phase and sent >= end - last_s]
        return served.count("int8") / len(served)

    low, high, fall = seen
    context = f"fp32 % per phase {seen}; gateway log:\n{log[-3000:]}"
    # fp32 keeps up with the low load; under the overload the weights and what served move
    # towards int8; when the load falls they move back towards fp32
    assert low >= 50 and int8_fraction(0, 3.0) < 0.25, context
    assert high < low and int8_fraction(1, 2.0) > int8_fraction(0, 3.0) + 0.3, context
    assert fall > high, context
    assert shifts["up"] and shifts["down"], (shifts, context)  # the controller's own counters
