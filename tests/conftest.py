import os

import pytest
import torch

from corruptcheck.cases import get_case
from corruptcheck.judge.reference_data import reference_run

# two pytest-xdist workers on two cores: one BLAS thread each
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """`tiny` gains nothing from more threads, and one thread stays fast on a busy 2-core machine
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def transformers():
    """transformers, or a skip: requested by the tests (and fixtures) that run the hf engine, so a
    module's other tests run without it."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny():
    return get_case("tiny")


@pytest.fixture(scope="session")
def tiny_ref(tiny):
    """(points, coverage) of the float64 reference on `tiny`."""
    return reference_run(tiny)


@pytest.fixture(scope="session")
def tiny_hf32(tiny):
    pytest.importorskip("transformers")
    from corruptcheck.engines.hf import run_hf

    return run_hf(tiny, "float32")


def fuzz_settings(examples: int, **kw):
    """Hypothesis settings for the property and fuzz tests: a fixed seed and `examples` inputs in
    CI (reproducible), or CORRUPTCHECK_FUZZ_EXAMPLES=N random ones for a longer exploration."""
    from hypothesis import HealthCheck, settings

    n = int(os.environ.get("CORRUPTCHECK_FUZZ_EXAMPLES", "0"))
    return settings(derandomize=not n, max_examples=n or examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], **kw)
