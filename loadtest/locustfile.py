"""A Locust user that speaks Triton's gRPC protocol to precision-serve (or Triton itself).

    locust -f loadtest/locustfile.py --host 127.0.0.1:8001 --model digits --precision int8
    locust -f loadtest/locustfile.py --headless -u 4 -t 30s --host 127.0.0.1:8001 --batch-size 8

Each user holds one ``tritonclient.grpc`` client (one channel) for its lifetime and closes it in
``on_stop`` (without that, Locust hangs at exit). gRPC is patched for gevent as Locust documents.
Every ModelInfer call is reported to Locust's statistics as ``<model>/<precision>`` with
request_type ``grpc``, failures included; a response served by another precision (a fallback)
counts as a failure, so numbers are never attributed to the wrong variant.

Options (command line, or the environment variable in brackets):
  --model [LOCUST_MODEL]          logical model (default digits)
  --precision [LOCUST_PRECISION]  fp32, fp16, bf16, int8, int8-dynamic (default fp32), or
                                  "policy": ask for none, the gateway's routing policy picks
                                  (every served precision is recorded, none is a mismatch)
  --precision-via [LOCUST_PRECISION_VIA]  "parameter" (request parameter ``precision`` on the
                                  logical model, the default) or "variant" (<model>_<precision>)
  --batch-size [LOCUST_BATCH_SIZE]  rows per request (default 1)
  --repository [LOCUST_REPOSITORY]  where <model>.samples.npz / the manifest are (inputs)
  --request-timeout [LOCUST_REQUEST_TIMEOUT]  client deadline in seconds (default 10)
  --stop-after [LOCUST_STOP_AFTER]  seconds to run once every user is spawned (headless: quit)
  --record [LOCUST_RECORD]        write every request's (start, latency, ok, served precision)
                                  to this .npz at exit (precision-loadtest's exact percentiles)
  --user-rate [LOCUST_USER_RATE]  requests/s per user, paced (0: closed loop, the default)
  --schedule [LOCUST_SCHEDULE]    users over time (loadtest/schedule.py); needs
                                  loadtest/schedule_shape.py loaded too (-f a.py,b.py)
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, events, task
from locust.env import Environment

# Locust has monkey-patched the standard library with gevent before loading this file; gRPC's
# C core must be told to cooperate before any channel exists.
grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402  (after init_gevent, on purpose)
from tritonclient.utils import InferenceServerException  # noqa: E402

from common.model_repository import to_datatype  # noqa: E402
from loadtest.inputs import SampleInputs, load_inputs, specs_from_metadata, synthetic  # noqa: E402

log = logging.getLogger("precision_loadtest")

DEFAULT_HOST = "127.0.0.1:8001"
PRECISION_PARAMETER = "precision"
POLICY = "policy"  # --precision policy: no precision asked for, the routing policy decides

# Every request of this process: wall-clock start (s), latency (s), success. Greenlets share one
# thread, so plain lists are safe.
_starts: list[float] = []
_latencies: list[float] = []
_oks: list[bool] = []
_served: list[str] = []  # the response's precision parameter ("" on failure)
_inputs: dict[tuple[str, int], SampleInputs] = {}
_environment: list[Environment] = []


class PrecisionMismatch(Exception):
    """The response was served by another precision than the one asked for (a fallback)."""


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    group = parser.add_argument_group("precision-serve")
    group.add_argument("--model", env_var="LOCUST_MODEL", default="digits", help="logical model")
    group.add_argument(
        "--precision", env_var="LOCUST_PRECISION", default="fp32", help="precision to request"
    )
    group.add_argument(
        "--precision-via",
        env_var="LOCUST_PRECISION_VIA",
        choices=["parameter", "variant"],
        default="parameter",
        help="request parameter on the logical model, or the variant's own name",
    )
    group.add_argument(
        "--batch-size", env_var="LOCUST_BATCH_SIZE", type=int, default=1, help="rows per request"
    )
    group.add_argument(
        "--repository",
        env_var="LOCUST_REPOSITORY",
        default="model_repository",
        help="model repository holding <model>.samples.npz / the manifest",
    )
    group.add_argument(
        "--request-timeout",
        env_var="LOCUST_REQUEST_TIMEOUT",
        type=float,
        default=10.0,
        help="client deadline per request, seconds",
    )
    group.add_argument(
        "--stop-after",
        env_var="LOCUST_STOP_AFTER",
        type=float,
        default=0.0,
        help="stop this many seconds after every user is spawned (0: never; unlike --run-time, "
        "start-up time does not eat into the window)",
    )
    group.add_argument(
        "--record",
        env_var="LOCUST_RECORD",
        default="",
        help="write every request's timing to this .npz when the test stops",
    )
    group.add_argument(
        "--user-rate",
        env_var="LOCUST_USER_RATE",
        type=float,
        default=0.0,
        help="requests per second per user (0: send the next as soon as one answers)",
    )
    group.add_argument(
        "--schedule",
        env_var="LOCUST_SCHEDULE",
        default="",
        help="users over time, e.g. 0:4,60:8 or ramp:4-16:180 (with loadtest/schedule_shape.py)",
    )


def _write_record(environment: Environment, **_kwargs: object) -> None:
    path = getattr(environment.parsed_options, "record", "") if environment.parsed_options else ""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.npz")
    np.savez(
        tmp,
        start=np.asarray(_starts, np.float64),
        latency=np.asarray(_latencies, np.float64),
        ok=np.asarray(_oks, bool),
        precision=np.asarray(_served, dtype=str),
    )
    tmp.replace(target)


events.test_stop.add_listener(_write_record)
events.quitting.add_listener(_write_record)


@events.spawning_complete.add_listener
def _arm_stop(user_count: int, **_kwargs: object) -> None:
    environment = _environment[0] if _environment else None
    if environment is None or environment.runner is None:
        return
    seconds = float(getattr(environment.parsed_options, "stop_after", 0) or 0)
    if seconds > 0:
        runner = environment.runner
        headless = bool(getattr(environment.parsed_options, "headless", False))
        gevent.spawn_later(seconds, runner.quit if headless else runner.stop)


@events.init.add_listener
def _keep_environment(environment: Environment, **_kwargs: object) -> None:
    _environment[:] = [environment]


def _strip_scheme(host: str) -> str:
    for prefix in ("grpc://", "http://", "https://"):
        if host.startswith(prefix):
            return host[len(prefix) :]
    return host


class TritonGrpcUser(User):
    """Closed loop: each user sends its next request as soon as the previous one answered;
    with ``--user-rate R`` at most R per second (paced from a random phase, like an open load
    until the answers take longer than 1/R)."""

    host = DEFAULT_HOST

    def wait_time(self) -> float:
        rate = float(getattr(self.environment.parsed_options, "user_rate", 0) or 0)
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        if self._due is None:
            self._due = now + random.uniform(0, 1 / rate)
        else:
            self._due = max(self._due + 1 / rate, now)
        return self._due - now

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model: str = opts.model
        self.precision: str = opts.precision
        self.batch_size: int = int(opts.batch_size)
        self.timeout: float = float(opts.request_timeout)
        self.stat_name = f"{self.model}/{self.precision}"
        self._due: float | None = None
        if self.precision == POLICY:
            self.target_model, self.parameters = self.model, None
        elif opts.precision_via == "variant":
            self.target_model, self.parameters = f"{self.model}_{self.precision}", None
        else:
            self.target_model, self.parameters = self.model, {PRECISION_PARAMETER: self.precision}
        self.client = grpcclient.InferenceServerClient(_strip_scheme(self.host or DEFAULT_HOST))
        try:
            samples = self._samples(opts.repository)
        except Exception:
            self.on_stop()  # an open channel left behind makes Locust hang at exit
            raise
        self.requests = [self._make_inputs(b) for b in samples.batches(self.batch_size)]
        self.turn = 0

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None

    def _samples(self, repository: str) -> SampleInputs:
        key = (self.model, self.batch_size)
        if key not in _inputs:
            found = load_inputs(Path(repository) if repository else None, self.model)
            if found is None:
                log.warning(
                    "no samples or manifest for %s under %r: synthetic inputs from server metadata",
                    self.model,
                    repository,
                )
                name = self.target_model
                meta = self.client.get_model_metadata(name)
                config = self.client.get_model_config(name)
                batched = config.config.max_batch_size > 0
                specs = specs_from_metadata(
                    [(t.name, t.datatype, list(t.shape)) for t in meta.inputs], batched
                )
                found = SampleInputs(synthetic(specs), "synthetic (server metadata)")
            _inputs[key] = found
        return _inputs[key]

    @staticmethod
    def _make_inputs(batch: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
        out = []
        for name, array in batch.items():
            t = grpcclient.InferInput(name, list(array.shape), to_datatype(array.dtype))
            t.set_data_from_numpy(array)
            out.append(t)
        return out

    @task
    def infer(self) -> None:
        inputs = self.requests[self.turn % len(self.requests)]
        self.turn += 1
        exception: Exception | None = None
        length = 0
        served = ""
        wall = time.time()
        started = time.perf_counter()
        try:
            result = self.client.infer(
                self.target_model,
                inputs,
                parameters=self.parameters,
                client_timeout=self.timeout,
            )
            response = result.get_response()
            length = sum(len(c) for c in response.raw_output_contents)
            served = response.parameters[PRECISION_PARAMETER].string_param
            if served and self.precision != POLICY and served != self.precision:
                raise PrecisionMismatch(f"served by {served}, asked for {self.precision}")
        except (InferenceServerException, grpc.RpcError, PrecisionMismatch) as e:
            exception = e
        elapsed = time.perf_counter() - started
        _starts.append(wall)
        _latencies.append(elapsed)
        _oks.append(exception is None)
        _served.append(served if exception is None else "")
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.stat_name,
            response_time=elapsed * 1000.0,
            response_length=length,
            exception=exception,
            context={"batch_size": self.batch_size},
        )
        if exception is not None:
            gevent.sleep(0.01)  # a down server must not spin the CPU
