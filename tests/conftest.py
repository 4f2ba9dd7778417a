"""Session fixtures: repositories built once and shared by every test that needs them.

Also the CI skip hook: under ``CI=true`` a test (or a whole module) that ends *skipped* is
reported as *failed*, with the skip reason, unless it is ``gpu``-marked. Skips raised anywhere
count: ``pytest.skip`` in the test, a fixture or setup, ``skip``/``skipif`` marks,
``pytest.importorskip`` and module-level skips at collection. Expected failures (``xfail``)
are not skips and are left alone. A missing component therefore cannot pass CI silently.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.helpers import in_ci, make_tiny_onnx

pytest_plugins = ["pytester"]


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = (
        str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    )
    return reason.removeprefix("Skipped: ")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped under CI=true, where every component must be present: {reason}"
    )


def _is_plain_skip(report: pytest.TestReport | pytest.CollectReport) -> bool:
    return report.skipped and not hasattr(report, "wasxfail")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if _is_plain_skip(report) and in_ci() and item.get_closest_marker("gpu") is None:
        _fail_skip(report, f"test ({report.when})")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if _is_plain_skip(report) and in_ci() and collector.get_closest_marker("gpu") is None:
        _fail_skip(report, f"collection of {collector.nodeid}")
    return report


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def quiet_build_host():
    """The shared repositories are built as on a quiet host whatever the load here: a manifest
    marked busy is re-timed by the gateway at start-up (server/routing/retime.py), which would
    replace the speeds the gateway tests set with this host's noisy ones."""
    from unittest import mock

    return mock.patch("builder.hostinfo.load_average", return_value=0.0)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> Path:
    """The tiny classifier built into fp32, fp16 and int8 variants (seconds, no torch)."""
    from builder.pipeline import BuildOptions, build_model

    repo = tmp_path_factory.mktemp("tiny_repository")
    with quiet_build_host():
        build_model(
            f"onnx:{tiny_onnx}",
            BuildOptions(repository=repo, precisions=["fp32", "fp16", "int8"], progress=False),
        )
    return repo


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo built into fp32, fp16 and int8 (trains once; cached afterwards): built
    once per run, by the first pytest-xdist worker that asks, into the run's shared temporary
    folder; the others wait for it (read-only, as tests use it)."""
    from filelock import FileLock

    from builder.pipeline import BuildOptions, build_model

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above popen-gw0, popen-gw1, ...
    repo = shared / "digits_repository"
    done = shared / "digits_repository.built"
    with FileLock(f"{repo}.lock"):
        if not done.exists():
            with quiet_build_host():
                build_model("digits", BuildOptions(repository=repo, progress=False))
            done.touch()
    return repo


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Llama as a Hugging Face folder (tests/llm.py; seconds)."""
    from tests.llm import tiny_llama_hf

    return tiny_llama_hf(tmp_path_factory.mktemp("tiny_llama") / "hf")


@pytest.fixture(scope="session")
def tiny_llama_genai(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Its onnxruntime-genai fp32 export (seconds)."""
    from tests.llm import genai_export

    return genai_export(tiny_llama, tmp_path_factory.mktemp("tiny_llama_genai") / "fp32")


@pytest.fixture(scope="session")
def tiny_llm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (tests/llm.py) built by ``precision-build`` as the LLM ``tinyllm`` into
    fp32, int8 and int4 (python-backend decoupled Triton models + manifest; genai builds
    cached): built once per run by the first pytest-xdist worker that asks, into the run's
    shared temporary folder; the others wait for it (read-only, as tests use it)."""
    from filelock import FileLock

    from builder.pipeline import BuildOptions, build_model
    from tests.llm import tiny_llama_hf

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    repo = shared / "tiny_llm_repository"
    done = shared / "tiny_llm_repository.built"
    with FileLock(f"{repo}.lock"):
        if not done.exists():
            hf = tiny_llama_hf(shared / "tiny_llm_hf" / "tinyllm")
            with quiet_build_host():
                build_model(
                    f"hf:{hf}",
                    BuildOptions(
                        repository=repo, precisions=["fp32", "int8", "int4"], progress=False
                    ),
                )
            done.touch()
    return repo
