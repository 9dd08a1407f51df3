"""pytest-benchmark entry point: ``pytest benchmarks/ --benchmark-only`` runs the suite's cases.

Not collected by the test run (``pytest tests``; pytest.ini's testpaths is ``tests``). ``--quick-cases`` uses the
CI-sized lengths of ``python -m benchmarks --quick``.
"""
import kernels  # noqa: F401  (first: turns on Triton's interpreter when there is no GPU)
import pytest

from benchmarks import suite
from benchmarks.device import cpu_threads, detect
from benchmarks.providers import providers_for


def pytest_addoption(parser):
    parser.addoption("--quick-cases", action="store_true", help="the lengths of `python -m benchmarks --quick`")


def pytest_generate_tests(metafunc):
    if "point" not in metafunc.fixturenames:
        return
    device = detect()
    groups = suite.cases(device.kind, metafunc.config.getoption("--quick-cases"), 1 << 30, suite.DIMS[device.kind])
    points = [(case, prov) for op, cases in groups.items() for prov in providers_for(op) for case in cases]
    # pytest-benchmark's table shows the ids alone: an interpreted Triton time says so, as the suite's "(interp)"
    ids = [f"{c.op}-{c.mode}-{p.name}-N{c.length}" + ("-interp" if device.interpreted and p.triton else "")
           for c, p in points]
    metafunc.parametrize("point", points, ids=ids)


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """On CPU, one torch thread, as ``python -m benchmarks`` (its ``--threads`` default): on a shared machine a small
    op waiting for a second, busy thread takes milliseconds instead of microseconds."""
    with cpu_threads(detect(), 1):
        yield
