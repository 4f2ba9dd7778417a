"""The lab's tests (``make test-lab``): the product tests' CI skip hook and shared fixtures
(tests/conftest.py) and the Triton ones (tests/triton/conftest.py), which apply under tests/
only unless imported here."""

from tests.conftest import (  # noqa: F401 (hooks and fixtures)
    digits_repository,
    pytest_make_collect_report,
    pytest_runtest_makereport,
    tiny_onnx,
    tiny_repository,
)
from tests.triton.conftest import start_triton, triton_distribution  # noqa: F401 (fixtures)
