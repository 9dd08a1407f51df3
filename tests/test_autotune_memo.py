"""The attention launch's memo of the autotuner's pick (issue #19, ``configs._PICKED``): on a GPU the first launch
of a key goes through Triton's autotuner (which times its configs and launches the fastest), later ones launch that
config directly, skipping ``Autotuner.run``'s per-call key rebuild (~25-30 us of host time on CPU). Run on CPU as a GPU runs
the launch code (not interpreted, an H100's family), with the kernel launch and the timing stubbed."""
import json

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import kernels
from kernels import _runtime
from kernels.attention import configs
from benchmarks import launch_path


CONFIG = ("BLOCK_M", "BLOCK_N", "TMA", "num_warps", "num_stages")
"""The config fields a launch's recorded kwargs are compared on."""
CASES = {"plain": (torch.float32, {}), "fp16": (torch.float16, {}), "causal": (torch.float32, {"causal": True}),
         "padded": (torch.float32, {"key_padding_mask": torch.ones(1, 40, dtype=torch.bool)})}


@pytest.fixture(scope="module")
def launches():
    """{case: {kernel: configs.launch's arguments}} of :data:`CASES` at (1, 2, 40, 64), captured before any GPU
    simulation."""
    if not kernels.INTERPRETED:
        pytest.skip("simulates the GPU launch path on CPU")
    return {case: launch_path.attention_launches(torch.device("cpu"), dtype, (1, 2, 40, 64), **options)
            for case, (dtype, options) in CASES.items()}


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The GPU launch path on CPU tensors (``launch_path.simulated_gpu``): {"tuned": [autotuner runs], "benched":
    [configs timed], "ran": [(grid, config kwargs) of each kernel launch]}. The fake timing makes the autotune
    list's last config the fastest, so that a launch that took the list's first would show."""
    calls = {"tuned": [], "benched": [], "ran": []}
    real_tuner_run = Autotuner.run

    def tuner_run(self, *args, **kwargs):
        calls["tuned"].append(self)
        return real_tuner_run(self, *args, **kwargs)

    def bench(self, *args, config, **kwargs):
        calls["benched"].append(config)
        return [float(len(self.configs) - self.configs.index(config))] * 3

    def run(self, *args, grid, warmup, **kwargs):
        grid = grid(dict(kwargs)) if callable(grid) else grid
        calls["ran"].append((grid, {name: kwargs[name] for name in CONFIG}))
    monkeypatch.setattr(Autotuner, "run", tuner_run)
    with launch_path.simulated_gpu(bench, run):
        yield calls


def _config(config):
    return {name: config.all_kwargs()[name] for name in CONFIG}


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_later_launches_take_the_autotuners_pick_without_it(on_a_gpu, launches, kernel):
    args, options = launches["plain"][kernel]
    for _ in range(3):
        configs.launch(kernel, *args, **options)
    tuner, = on_a_gpu["tuned"]  # the first launch only
    assert len(tuner.configs) > 1 and on_a_gpu["benched"] == tuner.configs
    picked = _config(tuner.configs[-1])  # the fastest by the fake timing
    rows, heads = args[:2]
    block = picked["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"]
    assert on_a_gpu["ran"] == [((-(-rows // block) * heads,), picked)] * 3


def test_a_launch_the_autotuner_keys_apart_is_tuned_again(on_a_gpu, launches):
    """Another dtype, causal flag or variant pointer (a key padding mask's) each go back through the autotuner."""
    for case in ("plain", "plain", "fp16", "causal", "padded", "fp16"):
        args, options = launches[case]["fwd"]
        configs.launch("fwd", *args, **options)
    assert len(on_a_gpu["tuned"]) == 4 and len(configs._PICKED) == 4  # once per case


def test_a_forced_config_still_wins(on_a_gpu, launches):
    args, options = launches["plain"]["fwd"]
    configs.launch("fwd", *args, **options)
    with kernels.registry.use_config("attention_fwd", BLOCK_M=16, BLOCK_N=32, num_warps=2, num_stages=1):
        configs.launch("fwd", *args, **options)
    assert on_a_gpu["ran"][-1][1] == dict(BLOCK_M=16, BLOCK_N=32, TMA=False, num_warps=2, num_stages=1)
    assert len(on_a_gpu["tuned"]) == 1


def test_the_launch_path_benchmark_times_every_layer(tmp_path):
    """``python -m benchmarks launch-path --quick``: a time for each kernel's autotuner, launch, kernel and binder
    paths, in JSON, CSV and a PNG; the simulation leaves no patch behind."""
    if not kernels.INTERPRETED:
        pytest.skip("the CPU simulation")
    run, picked = type(configs.KERNELS["fwd"]).run, configs._PICKED
    assert launch_path.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "launch_path.json").read_text())
    by = {(r["kernel"], r["path"]): r["us_per_call"] for r in doc["records"]}
    assert set(by) == {(k, p) for k in launch_path.KERNELS for p in launch_path.PATHS}
    assert all(us > 0 for us in by.values())
    assert (tmp_path / "launch_path.csv").exists() and (tmp_path / "launch_path.png").exists()
    assert type(configs.KERNELS["fwd"]).run is run and _runtime.INTERPRETED and configs._PICKED is picked


# ------------------------------------------------------------------------------ direct launches (kernels/_direct.py)


@pytest.fixture
def compiled_launches(monkeypatch):
    """The simulated GPU path with each kernel's ``run`` recording its launches and returning one compiled kernel
    per JIT function (``launch_path.StubCompiled``): {"run": [kernel names through JITFunction.run], "compiled":
    {kernel name: StubCompiled}}."""
    seen = {"run": [], "compiled": {}}
    names = {id(jit.fn): name for name, jit in configs.KERNELS.items()}

    def run(self, *args, grid, warmup, **kwargs):
        name = names[id(self.fn)]
        seen["run"].append(name)
        return seen["compiled"].setdefault(name, launch_path.StubCompiled())
    with launch_path.simulated_gpu(run=run):
        yield seen


@pytest.mark.parametrize("case", ["plain", "padded"])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_a_repeated_launch_goes_straight_to_its_compiled_kernel(compiled_launches, launches, kernel, case):
    """The first launch autotunes, the second runs the pick through JITFunction.run (whose compiled kernel is
    kept), the next ones launch that kernel directly: its launcher gets the grid, the stream, the launch hooks and
    exactly the arguments, in the order, that Triton's binder gives JITFunction.run's own launch."""
    from triton import knobs

    args, options = launches[case][kernel]
    for _ in range(4):
        configs.launch(kernel, *args, **options)
    assert compiled_launches["run"] == [kernel, kernel]
    compiled = compiled_launches["compiled"][kernel]
    assert len(compiled.calls) == 2
    rows, heads, runtime_args, meta = args[:4]
    picked, = configs._PICKED.values()
    block = picked["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"]
    bound = launch_path.bound_arguments(configs.KERNELS[kernel], runtime_args, dict(meta, **picked))
    expected = ((-(-rows // block) * heads), 1, 1, 0, None, None, None, knobs.runtime.launch_enter_hook,
                knobs.runtime.launch_exit_hook, *bound)
    assert all(call == expected for call in compiled.calls)  # == on tensors: identity first, so the same tensors


@pytest.fixture(scope="module")
def shorter_launch(launches):
    """The "plain" case's forward launch at 24 rows and keys instead of 40 (captured outside the simulation)."""
    return launch_path.attention_launches(torch.device("cpu"), torch.float32, (1, 2, 24, 64))["fwd"]


def test_a_launch_of_another_signature_goes_through_run_again(compiled_launches, launches, shorter_launch):
    """Another dtype, variant pointer or length each miss the direct launches (once each: then they hit)."""
    for case in ("plain", "plain", "plain", "fp16", "fp16", "padded", "padded", "plain"):
        args, options = launches[case]["fwd"]
        configs.launch("fwd", *args, **options)
    assert compiled_launches["run"] == ["fwd"] * 6  # autotune + run for each of the three cases
    for _ in range(3):
        configs.launch("fwd", *shorter_launch[0], **shorter_launch[1])
    assert compiled_launches["run"][6:] == ["fwd"]  # the same length bucket: the autotuner's pick, then direct


class _Subclass(torch.Tensor):
    """A tensor subclass the binder may treat otherwise (a Parameter it takes as a tensor)."""


def test_direct_launch_signatures(monkeypatch):
    """What may share a compiled kernel: the same dtypes, ints, bools and Nones, any float value, aligned pointers
    only; anything else has no signature (None: through run every time)."""
    from kernels import _direct
    from kernels._direct import DirectLaunches

    monkeypatch.setattr(_direct, "driver", launch_path.StubDriver)  # the current device: 0

    direct = DirectLaunches(configs.KERNELS["fwd"])
    n = direct.n_runtime
    x = torch.zeros(64, dtype=torch.float16)

    def args(first=x, fill=16):
        return (first,) + (fill,) * (n - 1)
    assert direct.key(args()) == direct.key(args()) is not None
    assert direct.key(args(fill=1)) != direct.key(args(fill=16)) != direct.key(args(fill=32))
    assert direct.key(args(fill=True)) != direct.key(args(fill=1))
    assert direct.key(args(fill=0.5)) == direct.key(args(fill=3.0)) != direct.key(args(fill=3))
    assert direct.key(args(x.float()[:32])) != direct.key(args())  # another dtype
    assert direct.key(args(x[1:])) is None  # 2 bytes past a 16-byte boundary: the binder would specialise it apart
    assert direct.key(args(torch.nn.Parameter(x))) == direct.key(args())  # the binder takes it as the tensor it is
    assert direct.key(args(x.as_subclass(_Subclass))) is None  # any other subclass
    assert direct.key(args(fill=(1, 2))) is None and direct.key(args()[:-1]) is None
    assert direct.key(args(), "extra") != direct.key(args(), "other")


def test_no_direct_launch_where_triton_launches_otherwise(compiled_launches, launches, monkeypatch):
    """A Triton whose JITFunction.run does not end in the launch the direct path repeats: every launch runs."""
    from kernels import _direct

    monkeypatch.setattr(_direct, "_supported", False)
    args, options = launches["plain"]["fwd"]
    for _ in range(3):
        configs.launch("fwd", *args, **options)
    assert compiled_launches["run"] == ["fwd"] * 3 and not compiled_launches["compiled"]["fwd"].calls
    monkeypatch.setattr(_direct, "_supported", None)
    assert _direct.supported()  # the installed Triton's run ends in those lines
    monkeypatch.setattr(_direct, "_supported", None)
    monkeypatch.setenv(_direct.SWITCH, "0")
    assert not _direct.supported()  # the user's switch
