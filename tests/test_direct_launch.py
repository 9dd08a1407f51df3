"""Direct launches of compiled kernels (``kernels/_direct.py``), for the launches that go through ``_direct.run``:
the row kernels, decoding's, varlen's offsets check and attention's backward pre-pass (attention's autotuned
launches are ``tests/test_autotune_memo.py``'s). On CPU the GPU path is simulated: not interpreted, each kernel's
``run`` returning a compiled kernel whose launch is recorded (``benchmarks.launch_path.StubCompiled``)."""
import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import _direct, _runtime
from kernels.flash_attn import flash_attn_with_kvcache
from benchmarks import launch_path
from toy_kernels import copy_kernel

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="simulates the GPU launch path on CPU")


@pytest.fixture
def simulated(monkeypatch):
    """{"run": [kernel names through JITFunction.run], "compiled": StubCompiled}, not interpreted."""
    seen = {"run": [], "compiled": launch_path.StubCompiled()}

    def run(self, *args, grid, warmup, **kwargs):
        seen["run"].append(self.fn.__name__)
        return seen["compiled"]
    monkeypatch.setattr(type(copy_kernel), "run", run)
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    monkeypatch.setattr(_direct, "driver", launch_path.StubDriver)
    monkeypatch.setattr(_direct, "_LAUNCHES", {})
    return seen


def test_a_repeated_launch_goes_straight_to_its_compiled_kernel(simulated):
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        _direct.run(copy_kernel, (x, y, 64), (4,), BLOCK=16, num_warps=2)
    assert simulated["run"] == ["copy_kernel"]
    from triton import knobs
    bound = launch_path.bound_arguments(copy_kernel, (x, y, 64), dict(BLOCK=16))
    assert simulated["compiled"].calls == [(4, 1, 1, 0, None, None, None, knobs.runtime.launch_enter_hook,
                                            knobs.runtime.launch_exit_hook, *bound)] * 2


def test_another_signature_or_option_goes_through_run(simulated):
    """Another length, block, option or a misaligned pointer: through JITFunction.run (then direct, if aligned)."""
    x, y = torch.zeros(64), torch.zeros(64)
    calls = [((x, y, 64), dict(BLOCK=16)), ((x, y, 48), dict(BLOCK=16)), ((x, y, 64), dict(BLOCK=32)),
             ((x, y, 64), dict(BLOCK=16, num_warps=8)), ((x[1:], y[1:], 63), dict(BLOCK=16))]
    for args, kwargs in calls + calls:
        _direct.run(copy_kernel, args, (4,), **kwargs)
    assert len(simulated["run"]) == len(calls) + 1  # each once, and the misaligned one every time
    assert len(simulated["compiled"].calls) == len(calls) - 1


def test_no_signature_for_an_unhashable_compile_time_argument(simulated):
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        _direct.run(copy_kernel, (x, y, 64), (4,), BLOCK=16, extra=[1])
    assert simulated["run"] == ["copy_kernel"] * 2
    # the same through DirectLaunches itself, as attention's launcher calls it (with its tile as the payload)
    direct = _direct.DirectLaunches(copy_kernel)
    key = direct.key((x, y, 64), ("extra", [1]))
    for _ in range(2):
        assert direct.get(key) is None
        direct.run(key, (x, y, 64), (4,), "payload", BLOCK=16)
    assert simulated["run"] == ["copy_kernel"] * 4


def test_interpreted_launches_run_the_kernel_and_keep_nothing():
    x, y = torch.arange(64.0), torch.zeros(64)
    _direct.run(copy_kernel, (x, y, 64), (4,), BLOCK=16)
    assert torch.equal(y, x) and copy_kernel not in _direct._LAUNCHES


@pytest.fixture
def direct_calls(monkeypatch):
    """[(kernel name, runtime arguments, keyword arguments)] of every ``_direct.run`` call, which still launch."""
    calls, real = [], _direct.run

    def record(jit, args, grid, **kwargs):
        calls.append((jit, args, kwargs))
        return real(jit, args, grid, **kwargs)
    monkeypatch.setattr(_direct, "run", record)
    return calls


def test_every_launch_through_it_has_a_signature(direct_calls, monkeypatch):
    """Each kernel that launches through ``_direct.run`` gets all its runtime arguments by position, plain and
    aligned, with hashable keywords: on a GPU its repeats would launch directly (a signature of None would mean
    JITFunction.run every time)."""
    x = torch.randn(4, 40, requires_grad=True)
    kernels.softmax(x).sum().backward()
    kernels.layer_norm(x, (40,)).sum().backward()
    kernels.rms_norm(x, (40,), torch.ones(40, requires_grad=True)).sum().backward()
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    kernels.attention(q, k, v, causal=True).sum().backward()
    packed = torch.randn(24, 2, 16)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    kernels.attention_varlen(packed, packed, packed, cu, cu, 14, 14)
    cache = torch.zeros(2, 64, 2, 16)
    new = torch.randn(2, 1, 2, 16)
    flash_attn_with_kvcache(torch.randn(2, 1, 2, 16), cache, cache.clone(), new, new,
                            cache_seqlens=torch.tensor([5, 9], dtype=torch.int32), num_splits=2)
    monkeypatch.setattr(_direct, "driver", launch_path.StubDriver)  # for the signatures' current device
    names = {jit.fn.__name__ for jit, _, _ in direct_calls}
    assert names >= {"_norm_fwd", "_norm_bwd", "_attn_bwd_delta", "_varlen_check", "_decode_append", "_decode_fwd",
                     "_decode_combine", "_decode_check"} and any("softmax" in name for name in names)
    for jit, args, kwargs in direct_calls:
        direct = _direct.DirectLaunches(jit)
        assert direct.key(args, *kwargs.items()) is not None, jit.fn.__name__
        hash(direct.key(args, *kwargs.items()))


@triton.jit
def _probe(X, Y, Z, n, m, f, BLOCK: tl.constexpr):
    """A kernel of every argument kind a signature tells apart (never launched here: only bound)."""
    offsets = tl.arange(0, BLOCK)
    tl.store(Y + offsets, tl.load(X + offsets) * f + n + m)


def test_launches_of_one_signature_get_one_specialisation(monkeypatch):
    """The soundness the direct path rests on, against Triton's own sm_90 binder: launches with the same signature
    get the same specialisation and options (hence the same compiled kernel), over tensors of several dtypes and
    alignments, ints around 1, 16 and the 32-bit edge, floats and a None pointer."""
    monkeypatch.setattr(_direct, "driver", launch_path.StubDriver)
    bind = launch_path.sm90_binder(_probe)
    direct = _direct.DirectLaunches(_probe)
    storage = torch.zeros(256)
    tensors = [storage[:64], storage[4:68], storage[1:65], storage.half()[8:72], storage[16:80]]
    ints = [0, 1, 2, 15, 16, 17, 32, -16, 2**31 - 1, 2**31, 2**32, 2**63 - 16]
    launches = [(x, y, z, n, m, f) for x in tensors[:4] for y in tensors[-2:] for z in (None, tensors[0])
                for n in ints for m in (1, 16) for f in (0.5, 2.0)]
    by_key = {}
    for args in launches:
        key = direct.key(args, ("BLOCK", 16))
        if key is None:  # a misaligned pointer: every launch through run
            assert any(t is not None and t.data_ptr() % 16 for t in args[:3])
            continue
        _, specialisation, options = bind(*args, BLOCK=16, debug=False, instrumentation_mode="")
        by_key.setdefault(key, set()).add((str(specialisation), str(options)))
    assert len(by_key) > 50 and all(len(kinds) == 1 for kinds in by_key.values())


def test_no_direct_launch_on_a_backend_that_specialises_otherwise(monkeypatch):
    """AMD's backend also marks tensors whose storage fits in 2 GB (buffer ops), which a signature does not hold:
    there every launch goes through run. NVIDIA's specialises as the signature assumes."""
    from triton.backends.compiler import GPUTarget

    class AmdDriver:
        class active(launch_path.StubDriver.active):
            get_current_target = staticmethod(lambda: GPUTarget("hip", "gfx942", 64))
    for driver, expected in ((AmdDriver, False), (launch_path.StubDriver, True)):
        monkeypatch.setattr(_direct, "driver", driver)
        monkeypatch.setattr(_direct, "_supported", None)
        assert _direct.supported() is expected
