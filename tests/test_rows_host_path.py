"""The row kernels' (softmax, layer/RMS norm) launch plans and their host path: what the GPU families compile, and
what every call costs and checks on the host before a launch."""
import importlib

from benchmarks import static

softmax_module = importlib.import_module("kernels.softmax")


def softmax_online_builds():
    """The softmax defaults on the online (multi-block) path, fp16, both kernels, every variant, NVIDIA table (the
    child process of the static report imports this by name)."""
    return [b for b in static.load_builds(static.PROVIDER) if b.kernel.startswith("_softmax")
            and not b.constexprs["SINGLE"] and b.dtype == "fp16" and 100 in b.families]


def test_softmax_online_chunks_compile_without_spills_on_sm100():
    """16 elements a thread (4096 on 8 warps) spilled 24 B in the fp16 online forward on sm_100; the online path
    takes 8 a thread (``python -m benchmarks static --kernel _softmax --defaults``: spill-free on sm_80, sm_90,
    sm_100 and gfx942)."""
    block, single, num_warps = softmax_module._config(softmax_module.MAX_BLOCK + 1)
    assert not single and block // (32 * num_warps) == softmax_module.ONLINE_PER_THREAD == 8
    records = static.run_report(archs=("sm_100",), provider="tests.test_rows_host_path:softmax_online_builds",
                                defaults_only=True)
    assert len(records) == 6 and all(r["default"] for r in records)
    assert [p for r in records for p in static.problems(r, calls_dot=False)] == []
