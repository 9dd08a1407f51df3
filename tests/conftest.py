"""Shared test set-up: the interpreter on CPU, a seeded RNG per test, the --runslow option and ``worker_id`` with or
without pytest-xdist; the fixtures several test files share (fallbacks made to raise, process groups)."""
import socket
import sys
from datetime import timedelta

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


def _forbidden(what):
    def raise_(*args, **kwargs):
        raise AssertionError(f"{what} ran where the Triton kernels should have")
    return raise_


@pytest.fixture
def torch_ops_allowed():
    """Opts a test out of :func:`rows_kernel_only`: for the tests about the row ops' torch path (float64, meta,
    an empty normalized shape, a jvp of a jvp, eps = inf, the fallback where the kernels cannot run)."""


@pytest.fixture
def rows_kernel_only(request, monkeypatch):
    """softmax's and the norms' torch ops paths (``_torch_ops``, ``_torch_norm``: taken where the kernels do not
    run) raise unless the test asks for ``torch_ops_allowed``, so a passing test proves the kernels ran: with the
    kernels stubbed out by those paths almost every row numerics test passed all the same. Files apply it with
    ``pytestmark = pytest.mark.usefixtures("rows_kernel_only")`` and take their truth from torch or float64."""
    if "torch_ops_allowed" not in request.fixturenames:
        monkeypatch.setattr(sys.modules["kernels.softmax"], "_torch_ops",
                            _forbidden("torch's ops (softmax's fallback)"))
        monkeypatch.setattr(sys.modules["kernels.layernorm"], "_torch_norm",
                            _forbidden("torch's ops (the norms' fallback)"))


@pytest.fixture
def attention_kernel_only(monkeypatch):
    """Make the attention fallbacks raise (``kernels.reference.attention``, which ``kernels.attention`` and
    ``attention_varlen`` run where the kernels cannot, and torch's SDPA behind the drop-in), so a passing test
    proves the Triton kernels ran. Tests compare with the reference captured before it (``_REFERENCE``)."""
    from kernels import reference
    from kernels.attention import sdpa

    monkeypatch.setattr(reference, "attention", _forbidden("kernels.reference.attention (the fallback)"))
    monkeypatch.setattr(sdpa, "_TORCH_SDPA", _forbidden("torch's SDPA (the drop-in's fallback)"))


@pytest.fixture
def hf_kernel_only(attention_kernel_only, monkeypatch):
    """``attention_kernel_only``, and the Hugging Face integration's fallback to a model's eager attention raises
    too: a patched model's every attention call ran the kernels. Not for float64 models (their attention runs
    the reference by design)."""
    from transformer import hf

    monkeypatch.setattr(hf, "_eager_attention", _forbidden("the model's eager attention (transformer.hf's fallback)"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking, for a gloo group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh():
    """A 1-rank gloo process group on 127.0.0.1 and its CPU device mesh, torn down after the module's tests."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def groups():
    """groups(world) -> a running gloo group of that many rank processes (test_distributed's ``_Group``), started
    once per session (again if one died: a case that timed out closes its group), closed at the session's end.
    Every test module's cases share it, so a case sets up what it needs (seed, subgroups) in the ranks itself."""
    from test_distributed import _Group

    started = {}

    def get(world: int) -> _Group:
        if world not in started or not started[world].alive():
            if world in started:  # a rank died: stop the survivors before starting a fresh group
                started[world].close()
            started[world] = _Group(world)
        return started[world]

    yield get
    for group in started.values():
        group.close()
