"""The bench's tests (``make test-lab``): the product tests' CI skip hook and shared fixtures
(tests/conftest.py), which apply under tests/ only unless imported here."""

from tests.conftest import (  # noqa: F401 (hooks and fixtures)
    digits_repository,
    pytest_make_collect_report,
    pytest_runtest_makereport,
    tiny_onnx,
    tiny_repository,
)
from tests.server.conftest import gateway  # noqa: F401 (test_perf_analyzer: tests/server's gateway)
from tests.server.test_shared_memory import gw  # noqa: F401 (its one-engine-thread gateway)
from tests.triton.conftest import start_triton, triton_distribution  # noqa: F401 (a real Triton)
