"""The code that only runs on a GPU, exercised on CPU through its seams: the direct launches of compiled kernels
(``kernels/_direct.py``) with the GPU path simulated (``benchmarks.launch_path``'s stubbed compiled kernel and
driver, checked against Triton's own sm_90 binder), the device a launch runs on (``_runtime.launch_device``), and
``make gpu-check``'s launch table as a GPU process reaches it."""
import contextlib
import types

import pytest
import torch
from triton import knobs

import kernels
from kernels import _direct, _runtime
from kernels.attention import configs
from benchmarks import gpu_check, launch_path
from benchmarks.device import detect
from test_direct_launch import simulated  # noqa: F401  (the simulated GPU launch path)
from toy_kernels import copy_kernel

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="simulates the GPU launch path on CPU")


def _launch_twice(*args, **kwargs):
    for _ in range(2):
        _direct.run(copy_kernel, args, (4,), BLOCK=16, **kwargs)


# ---------------------------------------------------------------------------------------------- signatures
def test_a_parameter_is_specialised_as_a_tensor_and_repeats_launch_directly(simulated):
    """A norm module's weight is an nn.Parameter: Triton's binder specialises it as the tensor it is, so its
    repeated launches go straight to the compiled kernel (they went through run every time)."""
    bind = launch_path.sm90_binder(copy_kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    weight, view = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(65)[1:])
    for p, t in ((weight, x), (view, x[1:])):
        assert (bind(p, y, 64, BLOCK=16, debug=False, instrumentation_mode="")[1]
                == bind(t, y, 64, BLOCK=16, debug=False, instrumentation_mode="")[1])
    _launch_twice(weight, y, 64)
    assert simulated["run"] == ["copy_kernel"] and len(simulated["compiled"].calls) == 1
    assert simulated["compiled"].calls[0][9] is weight  # the Parameter itself, first of the kernel's arguments
    _launch_twice(view, y, 64)  # misaligned: through run every time
    assert simulated["run"] == ["copy_kernel"] * 3 and len(simulated["compiled"].calls) == 1


def test_the_norm_modules_launches_have_a_signature(monkeypatch):
    """kernels.LayerNorm / RMSNorm (a model's norms) pass their Parameters to the kernels: every launch of their
    forward and backward must have a signature, or on a GPU each would pay Triton's binder."""
    calls, real = [], _direct.run
    monkeypatch.setattr(_direct, "run", lambda jit, args, grid, **kw: calls.append((jit, args, kw))
                        or real(jit, args, grid, **kw))
    x = torch.randn(3, 40, requires_grad=True)
    for norm in (kernels.LayerNorm(40), kernels.RMSNorm(40)):
        norm(x).sum().backward()
    monkeypatch.setattr(_direct, "driver", launch_path.StubDriver)
    assert {jit.fn.__name__ for jit, _, _ in calls} == {"_norm_fwd", "_norm_bwd"} and len(calls) == 4
    for jit, args, kwargs in calls:
        assert any(type(a) is torch.nn.Parameter for a in args)
        assert _direct.DirectLaunches(jit).key(args, *kwargs.items()) is not None, jit.fn.__name__


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int8, torch.int64])
def test_no_signature_for_a_view_the_binder_specialises_apart(dtype):
    """Every offset of a view (x[1:], x[2:], ...): the signature exists exactly where Triton's sm_90 binder marks
    both pointers 16-byte aligned, so a kernel compiled for aligned pointers never launches on a misaligned view."""
    bind = launch_path.sm90_binder(copy_kernel)
    direct = _direct.DirectLaunches(copy_kernel)
    base, y = torch.zeros(64, dtype=dtype), torch.zeros(64)
    keys = set()
    with _patched(_direct, driver=launch_path.StubDriver):
        for offset in range(17):
            x = base[offset:]
            aligned = [s for _, s in bind(x, y, 48, BLOCK=16, debug=False, instrumentation_mode="")[1][:2]]
            key = direct.key((x, y, 48), ("BLOCK", 16))
            assert (key is not None) == (aligned == ["D", "D"]), offset
            keys.add(key)
    assert len(keys - {None}) == 1  # the aligned offsets share one signature, hence one compiled kernel


def test_an_op_on_a_misaligned_view_launches_through_run(monkeypatch):
    """softmax and layer norm of a contiguous view 4 bytes past an aligned address (``buffer[1:]``) hand the kernel
    that pointer: its launches have no signature (a kernel compiled for aligned pointers would be wrong for it),
    the same op on an aligned view has one."""
    calls, real = [], _direct.run
    monkeypatch.setattr(_direct, "run", lambda jit, args, grid, **kw: calls.append((jit, args, kw))
                        or real(jit, args, grid, **kw))
    buffer = torch.randn(4 * 40 + 4)
    for start, expected in ((1, False), (4, True)):
        x = buffer[start:start + 160].view(4, 40)
        calls.clear()
        torch.testing.assert_close(kernels.softmax(x), torch.softmax(x, -1))
        torch.testing.assert_close(kernels.layer_norm(x, (40,)), torch.nn.functional.layer_norm(x, (40,)))
        with _patched(_direct, driver=launch_path.StubDriver):
            assert [_direct.DirectLaunches(jit).key(args, *kw.items()) is not None for jit, args, kw in calls] == [
                expected, expected], start
        assert any(t.data_ptr() == x.data_ptr() for t in calls[0][1] if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _patched(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def test_a_kernel_with_pre_run_hooks_launches_through_run_every_time(simulated, monkeypatch):
    """JITFunction.run calls the kernel's pre-run hooks before each launch, which a direct launch would skip."""
    monkeypatch.setattr(copy_kernel, "pre_run_hooks", [lambda *args, **kwargs: None])
    x, y = torch.zeros(64), torch.zeros(64)
    _launch_twice(x, y, 64)
    assert simulated["run"] == ["copy_kernel"] * 2 and not simulated["compiled"].calls


def test_a_stages_inspection_hook_sends_every_launch_through_run(simulated, monkeypatch):
    """With ``knobs.runtime.add_stages_inspection_hook`` set, run keys its cache on the hook's hash, which a
    signature does not hold."""
    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("key", "hash"), raising=False)
    x, y = torch.zeros(64), torch.zeros(64)
    _launch_twice(x, y, 64)
    assert simulated["run"] == ["copy_kernel"] * 2 and not simulated["compiled"].calls


# ---------------------------------------------------------------------------------------------- devices
class _TwoGpus:
    """torch.cuda's current device and ``torch.cuda.device`` of a two-GPU machine, and Triton's driver reading
    them (as Triton's GPU driver does: torch.cuda.current_device and the device's current stream)."""

    def __init__(self):
        self.current = 0

    @contextlib.contextmanager
    def device(self, index):
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous

    def driver(self):
        return types.SimpleNamespace(active=types.SimpleNamespace(
            get_current_device=lambda: self.current, get_current_stream=lambda index: 100 + index,
            get_current_target=launch_path.StubDriver.active.get_current_target))


def _on(index):
    """A stand-in for a tensor on cuda:``index`` (what launch_device reads of it)."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


def test_a_launch_for_a_tensor_on_another_gpu_runs_on_that_gpu_and_its_stream(simulated, monkeypatch):
    """Inputs on cuda:1 while cuda:0 is current: launch_device makes cuda:1 current, so run and the direct launch
    take cuda:1's compiled kernel (a signature per device) and its current stream; cuda:0 is current again after."""
    gpus = _TwoGpus()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: gpus.current)
    monkeypatch.setattr(torch.cuda, "device", gpus.device)
    monkeypatch.setattr(_direct, "driver", gpus.driver())
    x, y = torch.zeros(64), torch.zeros(64)
    for index in (1, 0, 1):
        with _runtime.launch_device(_on(index)):
            assert gpus.current == index
            _launch_twice(x, y, 64)
        assert gpus.current == 0
    assert simulated["run"] == ["copy_kernel"] * 2  # once per device
    assert [call[3] for call in simulated["compiled"].calls] == [101, 100, 101, 101]  # each device's stream
    assert _runtime.launch_device(_on(0)) is _runtime._NO_CONTEXT  # already current: nothing to switch


# ---------------------------------------------------------------------------------------------- gpu-check
def test_gpu_check_launch_table_after_the_same_attention_already_launched_directly(monkeypatch):
    """On a GPU the overhead phase's host times run attention at launch_path's very shape first, so each kernel's
    signature already has a direct launch when the launch table is measured; launch_path then found no autotuner
    pick to read (ValueError) and the table was an error record. A GPU process keeps configs' memos through
    launch_path.measure: simulated here by carrying them into its simulated GPU."""
    launches = launch_path.attention_launches(torch.device("cpu"), causal=True)
    with launch_path.simulated_gpu():
        for kernel in launch_path.KERNELS:
            args, options = launches[kernel]
            for _ in range(3):  # autotuned, through run, then directly
                configs.launch(kernel, *args, **options)
        earlier = configs._PICKED, configs._DIRECT
    assert all(len(earlier[1][kernel]._entries) == 1 for kernel in launch_path.KERNELS)
    real = launch_path.simulated_gpu

    @contextlib.contextmanager
    def as_on_a_gpu(*args, **kwargs):
        outer = configs._PICKED, configs._DIRECT  # what the process holds when the table is measured
        with real(*args, **kwargs):
            configs._PICKED, configs._DIRECT = outer
            yield

    monkeypatch.setattr(launch_path, "simulated_gpu", as_on_a_gpu)
    monkeypatch.setattr(configs, "_PICKED", earlier[0])
    monkeypatch.setattr(configs, "_DIRECT", earlier[1])
    monkeypatch.setattr(gpu_check, "OVERHEAD_REPEATS", 1)
    monkeypatch.setattr(gpu_check, "OVERHEAD_CALLS", 2)
    recs = gpu_check.launch_layers(detect())
    assert [r["status"] for r in recs] == ["ok"] * 15, recs[0].get("reason")
    assert {(r["kernel"], r["path"]) for r in recs} == {(k, p) for k in launch_path.KERNELS for p in launch_path.PATHS}
    assert (configs._PICKED, configs._DIRECT) == earlier and configs._DIRECT is earlier[1]  # left as they were


def test_a_competitor_that_fails_to_import_is_recorded_and_the_phase_goes_on():
    """A competitor installed but broken on the GPU image (Liger-Kernel raising on import against another Triton,
    say) raises something other than ImportError: its points are errors with the reason, every other point is
    still timed (the exception ended the whole rows phase)."""
    from benchmarks.providers import Case, Provider, provider

    def broken():
        raise RuntimeError("liger_kernel needs triton>=9")

    case = Case("softmax", "fwd", 32, dtype="float32", rows=2)
    items = [(case, Provider("liger", "softmax", broken, triton=True)), (case, provider("softmax", "torch")),
             (case, Provider("missing", "softmax", lambda: __import__("no_such_package")))]
    recs = gpu_check.time_points(detect(), gpu_check.Budget(1e9), "rows", items)
    assert [(r["provider"], r["status"]) for r in recs] == [("liger", "error"), ("torch", "ok"),
                                                            ("missing", "unavailable")]
    assert recs[0]["reason"] == "RuntimeError: liger_kernel needs triton>=9" and recs[1]["time"]["median_ms"] > 0
    assert gpu_check.is_failure(recs[0]) is False  # a competitor's failure is not ours


def test_records_are_utf8_and_replace_the_previous_file_whole(tmp_path, monkeypatch):
    """The GPU check saves partial results every 20 s under a time limit: a kill mid-write left a truncated JSON;
    units (µs) in a non-UTF-8 locale raised UnicodeEncodeError."""
    from benchmarks import records
    doc = {"records": [{"time_µs": 1.5}]}
    records.write(str(tmp_path), "r", doc)
    before = (tmp_path / "r.json").read_text(encoding="utf-8")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(records.json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        records.write(str(tmp_path), "r", {"records": []})
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == before  # the previous file, whole
    assert "time_µs" in (tmp_path / "r.csv").read_text(encoding="utf-8")
