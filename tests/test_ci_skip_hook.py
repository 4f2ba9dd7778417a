"""The CI skip hook in tests/conftest.py, run on a small inner test suite with and without CI=true.

A skip in the test body fails under CI; a skip in setup (a fixture, a ``skip`` mark) or at
collection (``pytest.importorskip`` at module level) becomes an error, which fails the run just
the same. ``gpu``-marked tests may still skip; ``xfail`` is not a skip.
"""

from __future__ import annotations

import pytest

INNER_CONFTEST = """
import pytest

from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401


@pytest.fixture
def missing_widget():
    pytest.skip("fixture says: no widget")
"""

INNER_TESTS = """
import pytest


def test_passes():
    assert True


def test_plain_skip():
    pytest.skip("body says: no widget")


def test_importorskip_in_body():
    pytest.importorskip("no_such_module_for_the_ci_hook")


@pytest.mark.skip(reason="mark says: no widget")
def test_skip_mark():
    pass


def test_skip_in_fixture(missing_widget):
    pass


@pytest.mark.gpu
def test_gpu_skip():
    pytest.skip("gpu says: no CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="gpu skipif says: no CUDA")
def test_gpu_skipif():
    pass


@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False
"""

INNER_MODULE_SKIP = """
import pytest

pytest.importorskip("no_such_module_for_the_ci_hook_either")


def test_never_collected():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(
        "[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\naddopts = -p no:cacheprovider\n"
    )
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester


def _outcomes(reprec: pytest.HookRecorder) -> dict[str, tuple[str, str]]:
    """test name -> (outcome as the summary counts it, the report text), from pytest's reports."""
    out: dict[str, tuple[str, str]] = {}
    for r in reprec.getreports("pytest_runtest_logreport"):
        name = r.nodeid.split("::")[-1]
        if r.failed:
            out[name] = ("error" if r.when != "call" else "failed", r.longreprtext)
        elif r.skipped:
            out[name] = ("xfailed" if hasattr(r, "wasxfail") else "skipped", r.longreprtext)
        elif r.when == "call":
            out.setdefault(name, ("passed", ""))
    return out


def test_without_ci_skips_stay_skips(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest("-rA")
    result.assert_outcomes(passed=1, skipped=6, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "skipped under CI=true" not in result.stdout.str()


def test_under_ci_only_gpu_skips_may_skip(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    reprec = inner.inline_run()
    assert reprec.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = _outcomes(reprec)
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "test_passes": "passed",
        "test_plain_skip": "failed",
        "test_importorskip_in_body": "failed",
        "test_skip_mark": "error",  # a skip in setup fails as an error
        "test_skip_in_fixture": "error",
        "test_gpu_skip": "skipped",
        "test_gpu_skipif": "skipped",
        "test_xfail": "xfailed",
    }
    for name, reason in {
        "test_plain_skip": "body says: no widget",
        "test_importorskip_in_body": "could not import 'no_such_module_for_the_ci_hook'",
        "test_skip_mark": "mark says: no widget",
        "test_skip_in_fixture": "fixture says: no widget",
    }.items():
        message = outcomes[name][1]
        assert "skipped under CI=true, where every component must be present: " in message
        assert reason in message, (name, message)


def test_module_level_importorskip(pytester: pytest.Pytester, monkeypatch) -> None:
    """A module skipped at collection is one skip without CI and a collection error under it."""
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_module_skip=INNER_MODULE_SKIP)

    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED

    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*collection of test_module_skip.py skipped under CI=true*"
            "could not import 'no_such_module_for_the_ci_hook_either'*"
        ]
    )


def test_under_ci_a_run_with_one_skip_fails(pytester: pytest.Pytester, monkeypatch) -> None:
    """Without a collection error in the way, the exit status is the ordinary 'tests failed'."""
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile("import pytest\n\ndef test_a():\n    pytest.skip('nope')\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
