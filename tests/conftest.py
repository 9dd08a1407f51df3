"""Shared test set-up: the interpreter on CPU, a seeded RNG per test, the --runslow option and ``worker_id`` with or
without pytest-xdist."""
import kernels  # noqa: F401  (first: turns on Triton's interpreter when there is no GPU)
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the cases marked slow (large interpreted shapes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large interpreted cases; skipped unless --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def worker_id(request):
    """pytest-xdist's worker name ("gw0", ...), or "master" in a run that is not distributed: also when xdist is
    not loaded at all (``-p no:xdist``), where its own fixture of this name does not exist."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture
def device():
    """Where the kernels run in this process: cuda on a GPU machine, cpu under the interpreter."""
    return torch.device("cpu" if kernels.INTERPRETED else "cuda")


@pytest.fixture
def dead_wrapper():
    """``make(x)``: the functorch wrapper of ``x`` that a finished ``torch.func.grad`` leaves behind (a tensor
    leaked out of the transform), which ``Function.apply`` unwraps outside transforms."""
    def make(x: torch.Tensor) -> torch.Tensor:
        leaked = []
        torch.func.grad(lambda t: leaked.append(t) or t.sum())(x)
        assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
        return leaked[0]
    return make


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches reset around the test: tests that compile the same code objects (a transformers
    model's forward) would otherwise add up their recompiles across the tests a worker runs, past dynamo's
    recompile limit (8), which fullgraph=True turns into a failure."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def sdpa_kernel_calls(monkeypatch):
    """A list that gets one entry per call the SDPA drop-in hands to the kernel (``attention_op``): q's shape."""
    from kernels.attention import sdpa

    calls = []
    run_kernel = sdpa.attention_op

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return run_kernel(*args, **kwargs)

    monkeypatch.setattr(sdpa, "attention_op", counted)
    return calls
