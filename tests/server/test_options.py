"""The gateway's options are declared once, by the packages that own them (issue 33).

``--help`` shows the groups and at most 20 options; the ``--workers`` hand-off carries every
option without a second list; docs/options.md is the page the code generates; the upstream's own
settings live in its URL query, checked by its package with errors naming the key and value.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
from pathlib import Path

import pytest

from common.options import options, to_argv
from server.app import FrontWorker, Shutdown
from server.errors import ConfigError
from server.runtime.options import GROUPS, build_parser, parse, reference
from server.runtime.workers import Supervisor
from server.upstreams.base import UpstreamSettings, parse_upstream

ROOT = Path(__file__).resolve().parents[2]
MAX_OPTIONS = 20


def test_help_shows_the_groups_and_at_most_20_options() -> None:
    parser = build_parser()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert titles[1:] == ["listen", "limits", "security", "upstream", "routing", "process"]
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    flags = [s for a in shown for s in a.option_strings if s not in ("-h", "--help")]
    assert len(flags) == len(set(flags)) <= MAX_OPTIONS, flags
    # every option is a field of one group's dataclass, and nothing else is an option
    assert sorted(flags) == sorted(
        "--" + (o.name or f.name).replace("_", "-")
        for cls in GROUPS
        for f, o in options(cls)
        if not o.hidden
    )
    # the hidden ones: internal (the supervisor -> its workers), parsed but not shown
    hidden = [s for a in parser._actions if a.help == argparse.SUPPRESS for s in a.option_strings]
    assert hidden == ["--front-worker"]
    text = parser.format_help()
    for title in titles[1:]:
        assert f"\n{title}:\n" in text


def test_docs_options_md_is_the_generated_page() -> None:
    committed = (ROOT / "docs" / "options.md").read_text()
    assert committed == reference(), "run: python -m server.runtime.options > docs/options.md"


# one value other than the default for every option (a new option must add one here)
def _non_defaults(tmp_path: Path) -> list[str]:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    return [
        "--host", "127.0.0.2",
        "--ports", "http=9000,grpc=9001,metrics=9002",
        "--tls", f"{tmp_path / 'c.pem'},{tmp_path / 'k.pem'}",
        "--max-request-bytes", "2048",
        "--message-limit", "max-request-bytes",
        "--grpc-max-concurrent-rpcs", "7",
        "--http-body-timeout", "2.5",
        "--http-max-connections", "11",
        "--auth-token-file", str(token),
        "--restricted-api", "metadata,health",
        "--model-control", "explicit",
        "--upstream",
        "triton://h:1,h:2?cancel=propagate&timeout_s=9&front=python",
        "--repository", str(tmp_path / "repo"),
        "--routing", str(tmp_path / "r.yaml"),
        "--retime", "never",
        "--workers", "3",
        "--loop", "asyncio",
        "--log-level", "debug",
        "--ready-file", str(tmp_path / "ready.json"),
        "--shutdown", "drain=1.5,grace=4",
        "--front-worker", "first=40010:40011",
    ]  # fmt: skip


def test_every_option_set_otherwise_reaches_a_worker_unchanged(tmp_path: Path) -> None:
    argv = _non_defaults(tmp_path)
    given = parse(argv)
    defaults = parse(["--repository", "r"])
    for group, default in zip(given.groups(), defaults.groups(), strict=True):
        for f, _ in options(group):  # the table above really leaves no option at its default
            assert getattr(group, f.name) != getattr(default, f.name), f.name
    assert given.security.auth_token == "s3cret"

    given.security.model_control = "none"  # explicit needs --workers 1 (checked below)
    supervisor = Supervisor(given)
    try:
        supervisor.ports = {"grpc_port": 40001, "http_port": 40000}
        worker = parse(supervisor.worker_argv(0))
    finally:
        shutil.rmtree(supervisor._dir)
    # what the supervisor changes for its workers, and only that
    assert (worker.listen.http_port, worker.listen.grpc_port) == (40000, 40001)
    assert worker.process.workers == 1
    assert worker.process.ready_file == supervisor._dir / "worker-0.json"
    for name in ("listen", "process"):
        ours, theirs = getattr(given, name), getattr(worker, name)
        for f, _ in options(ours):
            if f.name not in ("ports", "workers", "ready_file", "front_worker"):
                assert getattr(theirs, f.name) == getattr(ours, f.name), f.name
    for name in ("limits", "security", "upstream", "routing"):
        assert getattr(worker, name) == getattr(given, name), name
    assert "s3cret" not in supervisor.worker_argv(0)  # the token file's path, never the token
    assert worker.process.front_worker == FrontWorker()  # the supervisor's, not the given one


def test_workers_behind_one_envoy_get_their_part_in_the_front(tmp_path: Path) -> None:
    """The first worker gets the peers' loopback control ports; with Envoy in front, a peer
    listens on its own pair, on loopback, plain, and stays open for drain + grace; with the
    Python front, a peer is a worker on the public ports as before."""
    argv = ["--repository", "r", "--workers", "3", "--host", "0.0.0.0"]
    argv += ["--tls", f"{tmp_path / 'c.pem'},{tmp_path / 'k.pem'}", "--shutdown", "drain=2,grace=3"]
    argv += ["--upstream", "triton://127.0.0.1:8001?front=envoy"]
    supervisor = Supervisor(parse(argv))
    try:
        supervisor.ports = {"grpc_port": 40001, "http_port": 40000}
        supervisor.peers = [(40011, 40010), (40021, 40020)]
        first = parse(supervisor.worker_argv(0))
        assert first.process.front_worker == FrontWorker(((40011, 40010), (40021, 40020)))
        assert (first.listen.host, first.listen.grpc_port, first.listen.http_port) == (
            "0.0.0.0",
            40001,
            40000,
        )
        assert first.listen.tls is not None and first.process.workers == 1
        assert first.process.shutdown == Shutdown(2.0, 3.0)
        supervisor.front = "envoy"  # what the first worker's ready file said
        second = parse(supervisor.worker_argv(2))
        assert second.process.front_worker == FrontWorker(peer=True)
        assert (second.listen.host, second.listen.grpc_port, second.listen.http_port) == (
            "127.0.0.1",
            40021,
            40020,
        )
        assert second.listen.tls is None and second.process.shutdown == Shutdown(5.0, 3.0)
        assert second.process.ready_file == supervisor._dir / "worker-2.json"
        assert second.upstream == first.upstream and second.routing == first.routing
        supervisor.front = "python"
        peer = parse(supervisor.worker_argv(1))
        assert peer.process.front_worker == FrontWorker()
        assert (peer.listen.host, peer.listen.grpc_port, peer.listen.tls) == (
            "0.0.0.0",
            40001,
            first.listen.tls,
        )
    finally:
        shutil.rmtree(supervisor._dir)
    assert str(FrontWorker.parse("first=1:2,3:4")) == "first=1:2,3:4"
    for bad in ("first=1", "first=1:x", "peers=1:2", "first=0:2"):
        with pytest.raises(ConfigError, match="front worker"):
            FrontWorker.parse(bad)


def test_the_front_worker_option_is_for_workers_only(capsys: pytest.CaptureFixture[str]) -> None:
    from server.runtime.process import main

    assert main(["--repository", "r", "--front-worker", "peer"]) == 2
    assert "set by the --workers supervisor" in capsys.readouterr().err


def test_model_control_explicit_refuses_workers(tmp_path: Path) -> None:
    command_line = parse(["--repository", "r", "--workers", "2", "--model-control", "explicit"])
    with pytest.raises(ConfigError, match="--model-control explicit needs --workers 1"):
        Supervisor(command_line)


def test_defaults_write_no_arguments_and_values_read_back() -> None:
    defaults = parse(["--repository", "r"])
    assert defaults.argv() == ["--repository", "r"]
    for group in defaults.groups():
        if group is not defaults.routing:
            assert to_argv(group) == [], group


def test_no_second_list_of_options_in_the_cli_or_the_supervisor() -> None:
    """The CLI and the worker hand-off name no option: both come from the groups."""
    for path in ("server/cli.py", "server/runtime/workers.py", "server/runtime/process.py"):
        tree = ast.parse((ROOT / path).read_text())
        flags = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and re.fullmatch(r"--[a-z-]+(=.*)?", str(n.value))
        ]
        assert flags == [], (path, flags)


@pytest.mark.parametrize(
    "old",
    [
        ["--grpc-port", "0"],
        ["--http-port", "0"],
        ["--metrics-port", "0"],
        ["--tls-cert", "c"],
        ["--tls-key", "k"],
        ["--auth-token", "t"],
        ["--threads", "1"],
        ["--triton-cancellation", "propagate"],
        ["--triton-merge", "1"],
        ["--triton-merge-wait", "1"],
        ["--grace", "1"],
        ["--drain-seconds", "1"],
        ["--worker"],
    ],
)
def test_removed_spellings_are_refused_not_abbreviated(old: list[str]) -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments"):
        parse(["--repository", "r", *old])


def test_upstream_settings_come_from_the_url_query() -> None:
    assert parse_upstream("embedded") == ("embedded", "", UpstreamSettings())
    assert parse_upstream("embedded?threads=2")[2] == UpstreamSettings(threads=2)
    scheme, address, settings = parse_upstream(
        "triton://a:1,b:2?cancel=propagate&timeout_s=5&front=python&http=8000"
    )
    assert (scheme, address) == ("triton", "a:1,b:2")
    assert settings == UpstreamSettings(
        cancel_upstream=True,
        default_timeout_s=5.0,
        front="python",
        http_port=8000,
    )
    assert parse_upstream("triton://a:1")[2].front == "auto"  # the default front
    assert parse_upstream("triton+dns://svc:8001?interval=0.5&timeout_s=2")[1:] == (
        "svc:8001",
        UpstreamSettings(resolve_interval_s=0.5, default_timeout_s=2.0),
    )
    # the spec's settings replace the given ones, the rest stay
    base = UpstreamSettings(threads=3, max_workers=4)
    assert parse_upstream("embedded?threads=1", base)[2] == UpstreamSettings(1, 4)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("embedded?merge=1", "unknown setting 'merge' (known: threads, sequences, queue, max_"),
        ("embedded?threads", "threads needs a value"),
        ("embedded?threads=1&threads=2", "threads given twice"),
        ("embedded?threads=two", "threads='two': invalid literal"),
        ("triton://h:1?interval=1", "unknown setting 'interval'"),
        ("triton://h:1?timeout_s=0", "timeout_s='0': must be > 0"),
        ("triton://h:1?timeout_s=inf", "timeout_s='inf': must be > 0"),
        # request merging's keys (removed): the error names the key and why it is gone
        ("triton://h:1?merge=1", "setting 'merge' was removed: the gateway no longer merges"),
        ("triton+dns://n:1?merge_wait_ms=1", "setting 'merge_wait_ms' was removed: the gateway"),
        ("triton+dns://n:1?interval=-1", "interval='-1': must be > 0"),
        ("triton+dns://n:1?cancel=yes", "cancel='yes': must be one of detach, propagate"),
        ("triton://h:1?front=nginx", "front='nginx': must be one of auto, envoy, python"),
        ("triton://h:1?http=0", "http='0': must be a port number"),
    ],
)
def test_bad_upstream_settings_name_the_key_and_value(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_upstream(spec)
    assert needle in str(info.value) and spec in str(info.value)
