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
