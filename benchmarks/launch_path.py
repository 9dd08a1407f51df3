"""``python -m benchmarks launch-path``: host µs per attention launch on the GPU path, layer by layer.

On a GPU each attention launch (forward, dK/dV, dQ) is autotuned: ``configs.launch`` hands the first launch of a
key to Triton's autotuner and memoises its pick (``configs._PICKED``), so later launches skip ``Autotuner.run``,
which rebuilds its key from every argument on each call; and a launch it has made before, argument for argument,
goes straight to the compiled kernel (``kernels/_direct.py``), skipping Triton's JIT binder too. For the launches
of one small causal fp16 attention forward and backward, (1, 2, 16, 64), this times per call:

- ``autotuner``: ``configs.launch`` with neither memo, so every call goes through Triton's autotuner (a cache hit
  there) and the kernel's ``run``: the launch before both memos;
- ``memo``: ``configs.launch`` with the autotuner's memo only, then the kernel's ``run`` (on a GPU Triton's JIT
  binder, cache lookup and launcher): the launch before the direct launches;
- ``direct``: ``configs.launch`` as it is (the signature, its lookup, the compiled kernel's launch);
- ``run``: the kernel's own ``run`` with the picked config;
- ``binder`` (CPU only): Triton's argument binder for these arguments as built for an sm_90 GPU, the part of
  ``run`` that scales with the argument count, which ``direct`` skips.

On CPU the GPU path is simulated: the launch code runs as on an H100 (not interpreted, family 90), the autotuner's
timing is stubbed, and so are each kernel's ``run`` (it returns a compiled kernel whose launch does nothing) and the
driver's stream: ``run`` is only a call there, so a GPU's ``memo`` is about ``memo + binder`` of this table. On a GPU
every call launches for real: the time is that of back-to-back launches synchronised at the end, host-bound for
kernels this small. Writes ``launch_path.json`` / ``.csv`` / ``.png`` into ``--out``.
"""
import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

import kernels
from kernels import _direct, _runtime
from kernels.attention import configs
from benchmarks import overhead, plots, records
from benchmarks.device import DeviceInfo, cpu_threads, detect

KERNELS = ("fwd", "dkdv", "dq")
PATHS = ("autotuner", "memo", "direct", "run", "binder")
SIMULATED_FAMILY = 90
CONVENTIONS = {
    "kernel": "the attention launch: fwd (forward), dkdv and dq (the backward's two kernels) of a causal fp16 "
              "(1, 2, 16, 64) attention; path: autotuner, memo, direct, run or binder, as the module docstring "
              "(python -m benchmarks launch-path --help) describes each.",
    "us_per_call": "host microseconds per launch: the minimum over interleaved rounds of a round's mean. how: "
                   "simulated (CPU: the sm_90 launch code with the kernel's run, the autotuner's timing and the "
                   "driver's stream stubbed) or real launches back to back, synchronised at the end (a GPU).",
}
"""What ``launch_path.json``'s record fields mean."""


def attention_launches(device: torch.device, dtype: torch.dtype = torch.float16, shape=(1, 2, 16, 64),
                       **options) -> Dict[str, tuple]:
    """{kernel: (args, kwargs) of its ``configs.launch``} for one ``kernels.attention(q, k, v, **options)`` forward
    and backward of ``shape``, captured without launching (only the arguments matter)."""
    captured = {}
    real = configs.launch, configs.launch_delta  # the backward's pre-pass too: the outputs are never written
    configs.launch = lambda kernel, *args, **kwargs: captured.setdefault(kernel, (args, kwargs)) and None
    configs.launch_delta = lambda *args, **kwargs: None
    try:
        q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        kernels.attention(q, k, v, **options).sum().backward()
    finally:
        configs.launch, configs.launch_delta = real
    return captured


def _first_fastest(tuner, *args, config, **kwargs):
    """A stand-in for ``Autotuner._bench``: the list's first config is the fastest (a GPU's default)."""
    return [float(tuner.configs.index(config) + 1)] * 3


class StubCompiled:
    """A compiled kernel as ``JITFunction.run`` returns one, whose launch does nothing: ``calls`` records each
    launch's arguments as the launcher gets them (grid, stream, function, metadata, hooks, then every argument)."""

    function = packed_metadata = None

    def __init__(self):
        self.calls = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *launch):
        self.calls.append(launch)


class StubDriver:
    """``triton.runtime.driver`` as the direct launches read it: device 0 of an sm_90 GPU, stream 0."""

    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 0)
        @staticmethod
        def get_current_target():
            from triton.backends.compiler import GPUTarget

            return GPUTarget("cuda", SIMULATED_FAMILY, 32)


def _compiled_stub(self, *args, grid, warmup, **kwargs):
    return StubCompiled()


@contextlib.contextmanager
def simulated_gpu(bench: Callable = _first_fastest, run: Optional[Callable] = None) -> Iterator[None]:
    """The attention launch code as a GPU of family :data:`SIMULATED_FAMILY` runs it, on CPU tensors (an
    interpreting process only): not interpreted, the family's autotuners (``bench`` times a config:
    ``Autotuner._bench``'s signature) and each kernel's ``run`` replaced by ``run`` (default: returns a
    :class:`StubCompiled`, so the direct launches of ``kernels/_direct.py`` take it; nothing launches), the driver
    by device 0's stream 0. Autotuners, picks and direct launches made inside are dropped on leaving."""
    from triton.runtime.autotuner import Autotuner

    if not _runtime.INTERPRETED:
        raise RuntimeError("simulated_gpu: for an interpreting process (CPU); a GPU runs the real path")
    kernel_class = type(configs.KERNELS["fwd"])
    saved = (_runtime.INTERPRETED, configs.device_family, Autotuner._bench, kernel_class.run, configs._PICKED,
             configs._DIRECT, _direct.driver)
    _runtime.INTERPRETED, configs.device_family, Autotuner._bench = False, lambda device: SIMULATED_FAMILY, bench
    kernel_class.run = run or _compiled_stub
    configs._PICKED, configs._DIRECT, _direct.driver = {}, {}, StubDriver
    configs._tuned.cache_clear()
    try:
        yield
    finally:
        (_runtime.INTERPRETED, configs.device_family, Autotuner._bench, kernel_class.run, configs._PICKED,
         configs._DIRECT, _direct.driver) = saved
        configs._tuned.cache_clear()


def sm90_binder(jit) -> Callable:
    """Triton's JIT argument binder of ``jit`` (a JIT or interpreted kernel) as built for sm_90: ``bind(*args,
    **kwargs, debug=..., instrumentation_mode=...)`` -> (every argument by name in the signature's order, their
    specialisation, the options). Not public API: it raises where this Triton's internals differ."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    function = JITFunction(jit.fn)
    return create_function_from_signature(function.signature, function.params, make_backend(GPUTarget("cuda", 90, 32)))


def bound_arguments(jit, args: tuple, kwargs: dict) -> tuple:
    """Every argument of ``jit(*args, **kwargs)`` in the order ``JITFunction.run`` hands them to the compiled kernel
    on sm_90 (by Triton's own binder)."""
    params, _, _ = sm90_binder(jit)(*args, **kwargs, debug=False, instrumentation_mode="")
    return tuple(params.values())


def _binder(kernel: str, args: tuple, kwargs: dict) -> Optional[Callable[[], object]]:
    """A call of Triton's JIT argument binder for ``kernel``'s launch as built for sm_90, or None where this
    Triton's internals differ (the binder is not public API)."""
    try:
        bind = sm90_binder(configs.KERNELS[kernel])
        options = dict(kwargs, debug=False, instrumentation_mode="")
        bind(*args, **options)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    return lambda: bind(*args, **options)


class _Forgetful(dict):
    """A memo that keeps nothing: every launch goes through the autotuner."""

    def __setitem__(self, key, value):
        pass


class _NoDirect(_direct.DirectLaunches):
    """Direct launches that never match: every launch goes through the kernel's ``run``."""

    def key(self, args, *extra):
        return None


def _launch_with(kernel: str, args: tuple, options: dict, picked: dict, direct: dict) -> Callable[[], object]:
    """A call of ``configs.launch`` with ``picked`` as the autotuner's memo and ``direct`` as the direct launches."""
    def call():
        saved = configs._PICKED, configs._DIRECT
        configs._PICKED, configs._DIRECT = picked, direct
        try:
            return configs.launch(kernel, *args, **options)
        finally:
            configs._PICKED, configs._DIRECT = saved
    return call


def _calls(kernel: str, launch: tuple, simulated: bool) -> Dict[str, Callable[[], object]]:
    """{path: a zero-argument call} of one kernel's launch (after it was tuned and memoised)."""
    args, options = launch
    rows, heads, runtime_args, meta = args[:4]
    # (a GPU's autotuner keeps its own cache: the next launches take their picks again), and no direct launch of
    # this signature from earlier in the process (the overhead table runs this very shape), which would skip the pick
    configs._PICKED.clear()
    configs._DIRECT.pop(kernel, None)
    configs.launch(kernel, *args, **options)  # tunes (first sight) and memoises the pick
    picked, = configs._PICKED.values()
    fixed_grid = configs.grid(rows, heads, picked["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"])
    no_direct = {kernel: _NoDirect(configs.KERNELS[kernel])}
    calls = {"autotuner": _launch_with(kernel, args, options, _Forgetful(), no_direct),
             "memo": _launch_with(kernel, args, options, configs._PICKED, no_direct),
             "direct": lambda: configs.launch(kernel, *args, **options),
             "run": lambda: configs.KERNELS[kernel].run(*runtime_args, grid=fixed_grid, warmup=False, **meta,
                                                        **picked)}
    binder = _binder(kernel, runtime_args, dict(meta, **picked)) if simulated else None
    if binder is not None:
        calls["binder"] = binder
    return calls


def measure(device: DeviceInfo, repeats: int = 7, calls: int = 200) -> List[dict]:
    """One record per (kernel, path): min µs per call over ``repeats`` interleaved rounds of ``calls`` calls."""
    dev = device.torch_device
    simulated = dev.type == "cpu"
    launches = attention_launches(dev, causal=True)
    best: Dict[tuple, float] = {}
    with simulated_gpu() if simulated else contextlib.nullcontext():
        timed = {(kernel, path): call for kernel in KERNELS
                 for path, call in _calls(kernel, launches[kernel], simulated).items()}
        for call in timed.values():
            call()
        for _ in range(repeats):
            for key, call in timed.items():
                best[key] = min(best.get(key, float("inf")), overhead.time_call(call, dev, calls))
    how = f"simulated sm_{SIMULATED_FAMILY} path, launches stubbed" if simulated else "real launches, back to back"
    return [{"kernel": kernel, "path": path, "us_per_call": round(us, 2), "how": how}
            for (kernel, path), us in best.items()]


def format_table(recs: List[dict]) -> str:
    """One line per kernel: µs per call of each path, and what the direct launch saves (memo + binder - direct on
    CPU, where the simulated ``run`` has no binder; memo - direct on a GPU)."""
    by = {(r["kernel"], r["path"]): r["us_per_call"] for r in recs}
    paths = [p for p in PATHS if any(r["path"] == p for r in recs)]
    lines = [f"{'kernel':8}" + "".join(f"{p + ' µs':>14}" for p in paths) + f"{'saved per launch µs':>22}"]
    for kernel in KERNELS:
        saved = by[kernel, "memo"] + by.get((kernel, "binder"), 0.0) - by[kernel, "direct"]
        lines.append(f"{kernel:8}" + "".join(f"{by[kernel, p]:14.1f}" for p in paths) + f"{saved:22.1f}")
    return "\n".join(lines)


def plot(recs: List[dict], device: DeviceInfo, out: str) -> List[str]:
    """Grouped bars of each path's µs per launch, per kernel: [png], or [] without matplotlib."""
    if not plots.have_pyplot():
        return []
    plt = plots.plt
    paths = [p for p in PATHS if any(r["path"] == p for r in recs)]
    by = {(r["kernel"], r["path"]): r["us_per_call"] for r in recs}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        ax.bar([x + i * width for x in range(len(KERNELS))], [by[k, path] for k in KERNELS], width, label=path)
    ax.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(KERNELS))], KERNELS)
    ax.set_ylabel("host µs per launch")
    ax.set_title(f"Attention launch path on {device.name} ({recs[0]['how']})")
    ax.legend()
    return plots.save(fig, os.path.join(out, "launch_path.png"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks launch-path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default="results", help="folder for launch_path.json/.csv/.png")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and calls (a CI-sized run)")
    args = parser.parse_args(argv)
    device = detect()
    with cpu_threads(device, 1):  # host time of tiny launches: extra threads only add noise on a shared machine
        recs = measure(device, repeats=2 if args.quick else 7, calls=10 if args.quick else 200)
    print(f"device: {device.name}  ({recs[0]['how']})", flush=True)
    records.report(args.out, "launch_path", device, {**vars(args), "command": "launch-path"}, recs,
                   format_table(recs), plot, conventions=CONVENTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
