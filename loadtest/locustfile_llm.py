"""A Locust user that streams OpenAI completions from precision-serve (or any OpenAI server).

    locust -f loadtest/locustfile_llm.py --host http://127.0.0.1:8000 --model smollm2 \
        --precision int4 --max-tokens 64
    locust -f loadtest/locustfile_llm.py --headless -u 2 -t 30s --host 127.0.0.1:8000 ...

Each user holds one keep-alive HTTP connection (``http.client``, which Locust's gevent patching
makes cooperative) and sends ``stream: true`` requests in a closed loop; the server-sent events
are parsed by :mod:`loadtest.llm_stream`. Every request is reported to Locust as
``<model>/<precision>`` with request_type ``sse`` and its response time to the first token (the
time a user waits to see text); the full stream, TTFT, the chunk times and the token counts go
to ``--record``. A response served by another precision (a fallback) counts as a failure.

Options (command line, or the environment variable in brackets):
  --model [LOCUST_MODEL]           logical model (default smollm2)
  --precision [LOCUST_PRECISION]   fp32, int8, int4 (default fp32) or "policy" (the gateway picks)
  --precision-via [LOCUST_PRECISION_VIA]  "parameter": model "<model>:<precision>" (default);
                                   "variant": model "<model>_<precision>"
  --api [LOCUST_API]               completions (default) or chat
  --prompt [LOCUST_PROMPT]         the prompt (default: English prose ending mid-sentence)
  --max-tokens [LOCUST_MAX_TOKENS] tokens to generate per request (default 64)
  --temperature [LOCUST_TEMPERATURE]  0 = greedy (default)
  --request-timeout [LOCUST_REQUEST_TIMEOUT]  seconds the socket may stay silent (default 60)
  --stop-after [LOCUST_STOP_AFTER] seconds to run once every user is spawned (headless: quit)
  --record [LOCUST_RECORD]         write every request's timings and this process's CPU time
                                   over the run to this .npz at exit
  --user-rate [LOCUST_USER_RATE]   requests/s per user, paced (0: closed loop, the default)
"""

from __future__ import annotations

import http.client
import random
import resource
import time
from pathlib import Path

import gevent
import numpy as np
from locust import User, events, task
from locust.env import Environment

from loadtest.llm_stream import StreamResult, completion_request, stream_completion

POLICY = "policy"
# Open prose to continue: a completion prompt that ends mid-sentence, so greedy decoding goes on
# writing (an instruction as a plain completion prompt lets an instruct model end at once).
DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "made books cheaper to produce than ever before. Within a few decades, printers in many "
    "cities were publishing"
)

_results: list[StreamResult] = []
_environment: list[Environment] = []
# (wall clock, CPU seconds of this process) when every user was spawned; the record's CPU time
# covers spawn -> stop, the window the requests ran in.
_cpu_mark: list[tuple[float, float]] = []


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    g = parser.add_argument_group("precision-serve LLM")
    g.add_argument("--model", env_var="LOCUST_MODEL", default="smollm2", help="logical model")
    g.add_argument("--precision", env_var="LOCUST_PRECISION", default="fp32", help="precision")
    g.add_argument(
        "--precision-via",
        env_var="LOCUST_PRECISION_VIA",
        choices=["parameter", "variant"],
        default="parameter",
        help="model '<model>:<precision>' or the variant '<model>_<precision>'",
    )
    g.add_argument(
        "--api",
        env_var="LOCUST_API",
        choices=["completions", "chat"],
        default="completions",
        help="OpenAI API to stream from",
    )
    g.add_argument("--prompt", env_var="LOCUST_PROMPT", default=DEFAULT_PROMPT, help="prompt")
    g.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=64)
    g.add_argument("--temperature", env_var="LOCUST_TEMPERATURE", type=float, default=0.0)
    g.add_argument(
        "--request-timeout",
        env_var="LOCUST_REQUEST_TIMEOUT",
        type=float,
        default=60.0,
        help="seconds the connection may stay silent",
    )
    g.add_argument(
        "--stop-after",
        env_var="LOCUST_STOP_AFTER",
        type=float,
        default=0.0,
        help="stop this many seconds after every user is spawned (0: never)",
    )
    g.add_argument(
        "--record",
        env_var="LOCUST_RECORD",
        default="",
        help="write every request's timings to this .npz when the test stops",
    )
    g.add_argument(
        "--user-rate",
        env_var="LOCUST_USER_RATE",
        type=float,
        default=0.0,
        help="requests per second per user (0: closed loop)",
    )


def _write_record(environment: Environment, **_kwargs: object) -> None:
    path = getattr(environment.parsed_options, "record", "") if environment.parsed_options else ""
    if not path:
        return
    rs = list(_results)
    itl = [r.itl_samples() for r in rs]
    mark = _cpu_mark[0] if _cpu_mark else (min((r.start for r in rs), default=time.time()), 0.0)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.npz")
    np.savez(
        tmp,
        start=np.asarray([r.start for r in rs], np.float64),
        latency=np.asarray([r.latency_s for r in rs], np.float64),
        ok=np.asarray([r.ok for r in rs], bool),
        ttft=np.asarray([np.nan if r.ttft_s is None else r.ttft_s for r in rs], np.float64),
        decode=np.asarray([r.decode_s() or np.nan for r in rs], np.float64),
        tokens=np.asarray([r.output_tokens if r.ok else 0 for r in rs], np.int64),
        chunks=np.asarray([len(r.chunk_offsets_s) for r in rs], np.int64),
        precision=np.asarray([r.served if r.ok else "" for r in rs], dtype=str),
        error=np.asarray([r.error or "" for r in rs], dtype=str),
        itl=np.asarray([x for r, xs in zip(rs, itl, strict=True) if r.ok for x in xs], np.float64),
        # [wall seconds, CPU seconds] of this Locust process from spawn-complete to the end
        client_cpu=np.asarray([time.time() - mark[0], _cpu_seconds() - mark[1]], np.float64),
    )
    tmp.replace(target)


events.test_stop.add_listener(_write_record)
events.quitting.add_listener(_write_record)


@events.init.add_listener
def _keep_environment(environment: Environment, **_kwargs: object) -> None:
    _environment[:] = [environment]


@events.spawning_complete.add_listener
def _arm_stop(user_count: int, **_kwargs: object) -> None:
    _cpu_mark[:] = [(time.time(), _cpu_seconds())]
    environment = _environment[0] if _environment else None
    if environment is None or environment.runner is None:
        return
    seconds = float(getattr(environment.parsed_options, "stop_after", 0) or 0)
    if seconds > 0:
        runner = environment.runner
        headless = bool(getattr(environment.parsed_options, "headless", False))
        gevent.spawn_later(seconds, runner.quit if headless else runner.stop)


def _host_port(host: str) -> tuple[str, int]:
    for prefix in ("http://", "https://"):
        host = host.removeprefix(prefix)
    name, _, port = host.rstrip("/").rpartition(":")
    return (name, int(port)) if name else (port, 80)


class OpenAIStreamUser(User):
    """Closed loop of streamed completions; ``--user-rate R`` paces each user to R per second."""

    host = "127.0.0.1:8000"

    def wait_time(self) -> float:
        rate = float(getattr(self.environment.parsed_options, "user_rate", 0) or 0)
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        self._due = (
            now + random.uniform(0, 1 / rate)
            if self._due is None
            else (max(self._due + 1 / rate, now))
        )
        return self._due - now

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self._due: float | None = None
        precision = None if opts.precision == POLICY else opts.precision
        self.expect = precision
        self.request = completion_request(
            opts.model,
            precision,
            opts.prompt,
            int(opts.max_tokens),
            api=opts.api,
            temperature=float(opts.temperature),
            via=opts.precision_via,
        )
        self.stat_name = f"{opts.model}/{opts.precision}"
        host, port = _host_port(self.host or OpenAIStreamUser.host)
        self.conn = http.client.HTTPConnection(host, port, timeout=float(opts.request_timeout))

    def on_stop(self) -> None:
        self.conn.close()

    @task
    def stream(self) -> None:
        r = stream_completion(self.conn, self.request, expect_precision=self.expect)
        _results.append(r)
        self.environment.events.request.fire(
            request_type="sse",
            name=self.stat_name,
            response_time=(r.ttft_s if r.ttft_s is not None else r.latency_s) * 1000.0,
            response_length=r.output_tokens,
            exception=None if r.ok else Exception(r.error),
            context={},
        )
        if not r.ok:
            gevent.sleep(0.05)  # a down server must not spin the CPU
