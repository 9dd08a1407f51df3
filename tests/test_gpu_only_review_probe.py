"""Code that runs only on a GPU, reviewed against torch 2.13 / Triton 3.8 and exercised on CPU through its seams:
the autotuner's first sight of a launch from two threads at once (``configs.launch`` with the GPU path simulated by
``benchmarks.launch_path.simulated_gpu``), and ``make gpu-check``'s config phase (each specialisation's build is
checked by a call that launches that specialisation, the delta pre-pass with the config its launcher takes, the row
builds at widths picked by the GPU's own warp width)."""
import contextlib
import threading

import pytest
import torch

import kernels
from benchmarks import gpu_check, launch_path
from benchmarks.device import detect
from kernels.attention import configs, mods
from kernels.attention.kernels import _attn_fwd
from kernels.registry import all_builds

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="simulates the GPU paths on CPU")
TINY = gpu_check.AttentionShape(batch=1, heads=2, kv_heads=1, length=40)


# ---------------------------------------------------------------------------------------------- autotuning threads
def _tune_from_two_threads():
    """Two threads' first launches of the same autotuner (fp16 and bf16 forwards: one autotuner, two of its keys),
    the second starting while the first is inside the autotuner's timing: {thread name: its error or None}."""
    launches = {name: launch_path.attention_launches(torch.device("cpu"), dtype=dtype)["fwd"]
                for name, dtype in (("first", torch.float16), ("second", torch.bfloat16))}
    inside, second_done, errors = threading.Event(), threading.Event(), {}

    def bench(tuner, *args, config, **kwargs):
        if threading.current_thread().name == "first":
            inside.set()
            second_done.wait(timeout=0.3)  # the second tunes meanwhile, unless it waits for the first
        return [float(tuner.configs.index(config) + 1)] * 3

    def launch(name):
        args, options = launches[name]
        try:
            configs.launch("fwd", *args, **options)
            errors[name] = None
        except Exception as error:  # noqa: BLE001  (reported by the test)
            errors[name] = error
        finally:
            if name == "second":
                second_done.set()

    with launch_path.simulated_gpu(bench=bench):
        first = threading.Thread(target=launch, args=("first",), name="first")
        second = threading.Thread(target=launch, args=("second",), name="second")
        first.start()
        assert inside.wait(timeout=30)
        second.start()
        first.join(timeout=60)
        second.join(timeout=60)
        picked = dict(configs._PICKED)
    return errors, picked


def test_two_threads_tuning_the_same_autotuner_at_once_both_launch():
    """Triton's Autotuner.run keeps its call's arguments on itself and sets them to None when the call ends: a
    second thread's tuning ending inside the first's timing made the first raise TypeError (nn.DataParallel's
    replicas, or the autograd engine's threads of two GPUs, launching a shape for the first time)."""
    errors, picked = _tune_from_two_threads()
    assert errors == {"first": None, "second": None}
    assert len(picked) == 2 and all({"BLOCK_M", "BLOCK_N", "TMA"} <= set(p) for p in picked.values())


def test_without_the_tuning_lock_the_race_is_real(monkeypatch):
    """The same two threads with the lock taken out: the first thread's tuning fails (what the lock prevents)."""
    monkeypatch.setattr(configs, "_TUNING", contextlib.nullcontext())
    errors, _ = _tune_from_two_threads()
    assert isinstance(errors["first"], TypeError)


# ---------------------------------------------------------------------------------------------- gpu-check's configs
VARIANTS = sorted(set(configs._VARIANTS) - {"varlen"})


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variants_config_check_launches_that_specialisation(name, monkeypatch):
    """The configs phase checks each specialisation's build (forced tile) through kernels.attention: its call must
    turn the specialisation on, as the build declares it (configs._VARIANTS: a switch or mod in the compile-time
    arguments, or an argument passed instead of None). The chunk, mask-mod and score-mod builds were checked by a
    plain call (no attention_chunk, mask_mod or score_mod): their kernels never ran."""
    launched = []
    monkeypatch.setattr(configs, "launch", lambda kernel, rows, heads, args, meta, *rest, **kw:
                        launched.append((kernel, args, meta)))
    problem = gpu_check.attention_problem(torch.float32, 16, True, TINY, torch.device("cpu"), name)
    with torch.no_grad():
        problem.kernel(*problem.inputs)
    (kernel, args, meta), = [call for call in launched if call[0] == "fwd"]
    for param, value in configs._VARIANTS[name].items():
        if param not in _attn_fwd.arg_names:
            continue
        if isinstance(value, (str, tuple)):  # a pointer (or a mod's extra arguments) passed instead of None
            assert args[_attn_fwd.arg_names.index(param)] is not None, param
        else:
            assert meta[param] is value or meta[param] == value, param


def test_the_chunk_mask_and_score_mod_builds_pass_their_check():
    """Those three builds (fp32 d64 forward defaults, forced) against the float64 reference of the same attention:
    the chunk and the document mask as the reference's bool mask, the softcap score mod as its softcap."""
    builds = [next(b for b in all_builds() if b.kernel == "attention_fwd" and b.dtype == "fp32" and b.head_dim == 64
                   and b.default and b.variant == name) for name in ("chunk", "mask_mod", "score_mod")]
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(1e9), shape=TINY, builds=builds)
    assert [(r["variant"], r["causal"], r["status"]) for r in recs] == [
        (name, causal, "pass") for name in ("chunk", "mask_mod", "score_mod") for causal in (True, False)]
    assert all(0 < c["max_error"] <= c["bound"] for r in recs for c in r["checks"])


def test_row_builds_are_matched_with_the_gpus_own_warp_width(monkeypatch):
    """On ROCm (wave64: kernels._rows.lanes_of is 64) the softmax and norm modules launch their wave64 tables:
    the configs phase must pick each build's width by those, or it skipped every gfx942 build ("no row width
    selects it") and checked the NVIDIA builds at widths whose launch there runs another config."""
    monkeypatch.setattr(gpu_check, "lanes_of", lambda device: 64)
    row = gpu_check.row_builds(all_builds())
    wave64 = next(b for b in row if b.kernel == "_softmax_fwd" and b.families == ("gfx942",) and b.dtype == "fp32"
                  and not b.variant and b.constexprs["SINGLE"])
    nvidia = next(b for b in row if b.kernel == "_softmax_fwd" and b.families != ("gfx942",)
                  and b.constexprs == wave64.constexprs and b.dtype == "fp32")
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(1e9), rows=3, builds=[wave64, nvidia])
    assert [r["status"] for r in recs] == ["pass", "skipped"], recs
    assert gpu_check.row_config(wave64, recs[0]["width"], 64) == (wave64.constexprs["BLOCK"], True, wave64.num_warps)
    with pytest.raises(LookupError):
        gpu_check.row_width(wave64)  # an NVIDIA GPU (32 lanes) never launches it


def test_the_delta_pre_pass_builds_are_forced_with_what_their_launcher_takes():
    """The backward's delta pre-pass takes BLOCK_M and num_warps only: forcing its builds' num_stages too made every
    one of its config checks an error (use_config's ValueError), failing the GPU check."""
    build = next(b for b in all_builds() if b.kernel == "attention_bwd_delta" and b.dtype == "fp32" and b.head_dim == 64)
    assert gpu_check.forced_config(build) == {"BLOCK_M": build.constexprs["BLOCK_M"], "num_warps": build.num_warps}
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(1e9), shape=TINY, builds=[build])
    assert [r["status"] for r in recs] == ["pass", "pass"], [r.get("reason") for r in recs]
    fwd = next(b for b in all_builds() if b.kernel == "attention_fwd")
    assert set(gpu_check.forced_config(fwd)) == {"BLOCK_M", "BLOCK_N", "TMA", "num_warps", "num_stages"}


def test_use_config_names_no_required_keys_for_a_kernel_without_any():
    from kernels.registry import use_config
    with pytest.raises(ValueError) as error:
        with use_config("attention_bwd_delta", num_stages=1):
            pass
    assert str(error.value) == "use_config('attention_bwd_delta'): takes BLOCK_M, num_warps, got 'num_stages'"


def test_another_familys_tile_that_does_not_fit_this_gpu_is_skipped_not_failed(monkeypatch):
    """The configs phase runs every family's tiles; one that needs more shared memory than this GPU has (an sm_90
    tile on an A100) is never autotuned here: an OutOfResources there is no failure. A tile of this GPU's own
    family that does not fit stays an error."""
    from triton.runtime.errors import OutOfResources

    def no_room(*args, **kwargs):
        raise OutOfResources(232448, 166912, "shared memory")

    monkeypatch.setattr(gpu_check, "attention_problem", no_room)
    builds = [b for b in all_builds() if b.kernel == "attention_fwd" and b.dtype == "fp16" and b.head_dim == 128]
    ampere = next(b for b in builds if not configs.tiles("fwd", 80, 128, False).count(
        (b.constexprs["BLOCK_M"], b.constexprs["BLOCK_N"], b.num_warps, b.num_stages)) and not b.variant)
    own = next(b for b in builds if not b.variant and not b.constexprs["TMA"] and configs.tiles(
        "fwd", 80, 128, False)[0] == (b.constexprs["BLOCK_M"], b.constexprs["BLOCK_N"], b.num_warps, b.num_stages))
    monkeypatch.setattr(configs, "device_family", lambda device: 80)
    recs = gpu_check.check_configs(detect(), gpu_check.Budget(1e9), shape=TINY, builds=[ampere, own])
    assert [r["status"] for r in recs] == ["error", "error", "skipped", "skipped"], recs  # own (a default) first
    assert all("OutOfResources" in r["reason"] for r in recs)
