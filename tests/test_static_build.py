"""The GPU-target build report (``python -m benchmarks static``): its parsers, its compiles, and the bar.

Three layers: the text parsers and the occupancy arithmetic on canned tool output (no compile); the report on
tiny kernels of this file (a copy, a 64x64x64 fp16 ``tl.dot``, a register hog that must spill, a broken build),
registered into their own list rather than the package's; and the package's own registered kernels, a
representative subset (``--quick``: the default fp16 config at head dim 64/128), on sm_80 and sm_90, each build
on the architectures whose family tables try it (``--quick --defaults``: a gfx942 or sm_100 build is not
compiled for sm_80).

The compiles run in child processes with the interpreter off; each report runs once per test session, shared
by the pytest-xdist workers through a file lock.
"""
import ast
import inspect
import json
import os
import re
import textwrap
import types

import pytest
import triton
import triton.language as tl
from filelock import FileLock
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from benchmarks import static
from benchmarks.gpu_build import ARCHS, count_sass, occupancy, parse_amdgcn, parse_ptxas_log, parse_resource_usage
from kernels.registry import Build, declare
from tests.toy_kernels import copy_kernel, matmul_kernel


# ----------------------------------------------------------------------------------------------------------------
# Tiny kernels of our own, in their own build list (the package registry stays untouched).

@triton.jit
def _register_hog(X, Y, M: tl.constexpr, N: tl.constexpr):
    # One warp holding an M x N fp32 tile live across two row reductions: far more than 255 registers per thread.
    offsets = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(X + offsets)
    total = tl.sum(x, axis=1)
    peak = tl.max(x * x, axis=1)
    tl.store(Y + offsets, x * total[:, None] + tl.exp(x - peak[:, None]))


_MATMUL_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "constexpr", "N": "constexpr", "K": "constexpr"}
_HOG_SIG = {"X": "*fp32", "Y": "*fp32", "M": "constexpr", "N": "constexpr"}


def tiny_builds():
    """The build list the tiny report compiles (imported by the report's child process by name)."""
    return [
        Build("copy", copy_kernel, {"X": "*fp16", "Y": "*fp16", "N": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
              num_warps=4, num_stages=1, label="fp16 BLOCK=1024", dtype="fp16", divisible_by_16=("X", "Y")),
        Build("matmul", matmul_kernel, _MATMUL_SIG, {"M": 64, "N": 64, "K": 64}, num_warps=4, num_stages=3,
              label="fp16 64x64x64", dtype="fp16", divisible_by_16=("A", "B", "C")),
        Build("matmul_m32", matmul_kernel, _MATMUL_SIG, {"M": 32, "N": 64, "K": 64}, num_warps=4, num_stages=3,
              label="fp16 32x64x64", dtype="fp16", divisible_by_16=("A", "B", "C")),
        Build("register_hog", _register_hog, _HOG_SIG, {"M": 64, "N": 128}, num_warps=1, num_stages=1,
              label="fp32 64x128", dtype="fp32"),
        # K=3 is not a power of two: tl.arange refuses it, so this build must come back as an error record.
        Build("broken", matmul_kernel, _MATMUL_SIG, {"M": 64, "N": 64, "K": 3}, num_warps=4, num_stages=1,
              label="fp16 K=3", dtype="fp16"),
    ]


def shifting_builds():
    """A provider whose list differs in the child process (interpreter off): its worker must refuse to go on."""
    builds = tiny_builds()
    return builds[1:] if os.environ.get("TRITON_INTERPRET") == "0" else builds


TINY = "tests.test_static_build:tiny_builds"  # the child process imports it from the repository root
TINY_ARCHS = ("sm_80", "sm_90", "sm_100", "gfx942")
BAR_ARCHS = ("sm_80", "sm_90")
FAMILY_ARCHS = {80: "sm_80", 90: "sm_90", 100: "sm_100", "gfx942": "gfx942"}


def _once_per_session(tmp_path_factory, worker_id, name, **report_args):
    """``static.run_report(**report_args)``, computed by the first xdist worker that asks and read by the rest."""
    if worker_id == "master":
        return static.run_report(**report_args)
    path = tmp_path_factory.getbasetemp().parent / f"static-build-{name}.json"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            path.write_text(json.dumps(static.run_report(**report_args)))
        return json.loads(path.read_text())


def test_worker_id_names_the_xdist_worker_or_master(worker_id):
    assert worker_id == "master" or re.fullmatch(r"gw\d+", worker_id)


def test_worker_id_exists_without_xdist_loaded(request):
    """The session fixtures below share one report between xdist workers through ``worker_id``; a run with
    pytest-xdist not loaded at all must still have the fixture: the one in effect is conftest.py's (it overrides
    xdist's where xdist is loaded), which names the master where xdist gave the process no worker input."""
    ours = request._fixturemanager.getfixturedefs("worker_id", request.node)[-1]
    assert ours.func.__code__.co_filename == os.path.join(os.path.dirname(__file__), "conftest.py")
    assert ours.func(types.SimpleNamespace(config=types.SimpleNamespace())) == "master"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, worker_id):
    records = _once_per_session(tmp_path_factory, worker_id, "tiny", archs=TINY_ARCHS,
                                provider=TINY)
    return {(r["kernel"], r["arch"]): r for r in records}


# ----------------------------------------------------------------------------------------------------------------
# Parsers and arithmetic, on canned tool output.

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _helper
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_attn_bwd' for 'sm_80'
ptxas info    : Function properties for _attn_bwd
    240 bytes stack frame, 240 bytes spill stores, 228 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 440 bytes cmem[0]
"""

AMDGCN_META = """
amdhsa.kernels:
  - .agpr_count:     4
    .group_segment_fixed_size: 512
    .private_segment_fixed_size: 16
    .sgpr_count:     30
    .sgpr_spill_count: 0
    .vgpr_count:     128
    .vgpr_spill_count: 3
"""

SASS = """
        /*0100*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0110*/              @!P0 LDG.E R8, desc[UR6][R2.64+0x10] ;
        /*0120*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0130*/              @UP1 HGMMA.64x64x16.F32 gdesc[UR4], RZ, !UPT ;
        /*0140*/                   UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR11], UPT ;
        /*0150*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0160*/                   STL [R1+0x4], R3 ;
        /*0170*/                   STG.E.64 desc[UR6][R2.64], R6 ;
        /*0180*/                   EXIT ;
"""


def test_ptxas_log_gives_registers_spills_and_stack():
    assert parse_ptxas_log(PTXAS_LOG) == {"registers": 255, "stack": 240, "spill_stores": 240, "spill_loads": 228}
    with pytest.raises(ValueError, match="log"):
        parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_resource_usage_and_amdgcn_metadata():
    usage = parse_resource_usage(" Function k:\n  REG:71 STACK:8 SHARED:1024 LOCAL:8 CONSTANT[0]:392 TEXTURE:0")
    assert usage == {"reg": 71, "stack": 8, "shared": 1024, "local": 8}
    meta = parse_amdgcn(AMDGCN_META + "\tv_mfma_f32_32x32x8_f16 a[0:15], v[0:1], v[2:3], 0\n\tv_add_f32 v1, v2, v3\n")
    assert meta == {"vgpr_count": 128, "sgpr_count": 30, "agpr_count": 4, "vgpr_spill_count": 3,
                    "sgpr_spill_count": 0, "group_segment_fixed_size": 512, "private_segment_fixed_size": 16,
                    "mfma": 1, "mfma_ops": {"v_mfma_f32_32x32x8_f16": 1}}
    with pytest.raises(ValueError, match=r"\.agpr_count"):
        parse_amdgcn(AMDGCN_META.replace(".agpr_count", ".other"))


def test_sass_counts_group_tensor_core_and_memory_opcodes():
    from benchmarks.gpu_build import sass_summary

    counts = count_sass(SASS)
    assert counts["LDG"] == 2 and counts["EXIT"] == 1  # the predicated load counts too
    summary = sass_summary(counts)
    assert summary["mma"] == 3 and summary["mma_ops"] == {"HMMA": 1, "HGMMA": 1, "UTCHMMA": 1}
    assert (summary["LDG"], summary["STG"], summary["TMA"], summary["STL"], summary["LDGSTS"]) == (2, 1, 1, 1, 0)
    assert summary["UTMALDG"] == 1 and sass_summary(count_sass(SASS.replace("UTMALDG", "UTMASTG")))["UTMALDG"] == 0


@pytest.mark.parametrize("registers, shared, warps, arch, ctas, limiter", [
    (255, 0, 4, "sm_80", 2, "registers"),  # 8192 registers a warp: 2 warps per SM quarter
    (74, 16384, 4, "sm_80", 6, "registers"),  # 2560 a warp: 6 per quarter, 24 warps
    (16, 0, 4, "sm_90", 16, "warps"),  # 64 warps per SM
    (16, 0, 1, "sm_90", 32, "warps"),  # 32 CTAs per SM at most
    (64, 100 * 1024, 4, "sm_80", 1, "shared"),  # 164 KB per SM
    (64, 100 * 1024, 4, "sm_90", 2, "shared"),  # 228 KB per SM
    (64, 200 * 1024, 4, "sm_80", 0, "shared"),  # over A100's 163 KB per block: cannot launch
])
def test_occupancy_estimate(registers, shared, warps, arch, ctas, limiter):
    est = occupancy(registers, shared, warps, ARCHS[arch])
    assert (est["ctas_per_sm"], est["limited_by"], est["warps_per_sm"]) == (ctas, limiter, ctas * warps)


def _fake(kernel, dtype, label, head_dim=None, variant="", default=False, families=()):
    return Build(kernel, None, {"X": f"*{dtype}", "N": "i32"}, {}, 4, 2, label, dtype, head_dim, variant,
                 default=default, families=families)


def test_defaults_and_quick_subset():
    builds = [
        _fake("attn_fwd", "fp16", "fp16 64x64", 64),
        _fake("attn_fwd", "fp16", "fp16 128x64", 64),  # second config: not the default
        _fake("attn_fwd", "bf16", "bf16 D=128", 128),
        _fake("attn_fwd", "fp16", "fp16 hd256", 256),  # default, but not a quick head dim
        _fake("softmax_fwd", "fp16", "fp16 BLOCK=1024"),
        _fake("norm_fwd", "fp32", "fp32 layer BLOCK=1024", variant="layer"),  # no fp16 build: its first default
        _fake("norm_fwd", "fp32", "fp32 rms BLOCK=1024", variant="rms"),  # same kernel, another family: own default
        _fake("norm_fwd", "fp32", "fp32 rms BLOCK=4096", variant="rms"),
    ]
    infos = [static.describe(b) for b in builds]
    assert [i["family"] for i in infos] == ["attention forward"] * 4 + ["softmax", "layer norm", "rms norm",
                                                                        "rms norm"]
    assert infos[2]["head_dim"] == 128 and infos[4]["head_dim"] is None
    assert static.select(builds) == [(0, True), (1, False), (2, True), (3, True), (4, True), (5, True),
                                     (6, True), (7, False)]
    assert static.select(builds, quick=True) == [(0, True), (4, True), (5, True), (6, True)]
    assert static.select(builds, kernel="soft") == [(4, True)]


def test_the_report_reads_fields_never_the_label():
    """Family, dtype and head dim come from ``Build.kernel``/``variant``/``dtype``/``head_dim``: a label that
    says otherwise changes nothing."""
    misleading = _fake("norm_fwd", "bf16", "fp16 d64 layer dropout BLOCK=1024", variant="rms")
    assert {k: v for k, v in static.describe(misleading).items() if k in ("family", "dtype", "head_dim")} == \
        {"family": "rms norm", "dtype": "bf16", "head_dim": None}


def test_every_registered_build_has_a_report_family_and_its_fields():
    """The package's builds all fall in one of :data:`static.FAMILIES` (none is "other"), and each attention
    build's head dim is the one it was compiled for."""
    builds = static.load_builds(static.PROVIDER)
    assert [b.kernel for b in builds if static.describe(b)["family"] == static.OTHER] == []
    assert all(b.head_dim == b.constexprs["HEAD_DIM"] for b in builds if "HEAD_DIM" in b.constexprs)
    assert {b.dtype for b in builds} == {"fp16", "bf16", "fp32", "u8", "i32"}


def test_a_declared_head_dim_must_match_its_head_dim_constexpr():
    from kernels.attention.decode import _decode_combine
    tile = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=16)
    options = dict(dtype="fp16", constexprs=tile, num_warps=4, num_stages=1, label="fp16 d64")
    assert declare("combine", _decode_combine, head_dim=64, **options).head_dim == 64
    with pytest.raises(ValueError, match="head_dim=128 differs from its HEAD_DIM constexpr 64"):
        declare("combine", _decode_combine, head_dim=128, **options)


def test_builds_marked_default_are_the_defaults_of_their_group():
    builds = [
        _fake("attn_fwd", "fp16", "fp16 128x64", 64),
        _fake("attn_fwd", "fp16", "fp16 64x64", 64, default=True),  # marked: not the first
        _fake("attn_fwd", "fp16", "fp16 128x64", 128),  # a group marking none: its first
        _fake("attn_fwd", "fp16", "fp16 64x32", 128),
        _fake("softmax_fwd", "fp16", "fp16 BLOCK=1024", default=True),  # one config per row width: two defaults
        _fake("softmax_fwd", "fp16", "fp16 BLOCK=1024 causal", variant="causal"),
        _fake("softmax_fwd", "fp16", "fp16 BLOCK=16384", default=True),
    ]
    assert static.select(builds) == [(0, False), (1, True), (2, True), (3, False), (4, True), (5, False), (6, True)]
    assert static.select(builds, quick=True) == [(1, True), (2, True), (4, True), (6, True)]


def test_a_family_default_is_held_to_the_bar_on_its_own_architectures_only():
    """A config that only sm_80 launches try first is no sm_90 default (sm_100 and AMD have tables of their own,
    gfx90a runs gfx942's): ``--defaults`` compiles each default for the architectures that run it."""
    builds = [_fake("attn_fwd", "fp16", f"fp16 {family}", default=True, families=(family,))
              for family in (80, 90, 100, "gfx942")]
    builds += [_fake("attn_fwd", "fp16", "fp16 c", default=True), _fake("attn_fwd", "fp16", "fp16 d")]
    on = {arch: [static.on_family(b, arch) for b in builds] for arch in ("sm_80", "sm_90", "sm_100", "gfx942",
                                                                          "gfx90a")}
    assert on == {"sm_80": [True, False, False, False, True, True], "sm_90": [False, True, False, False, True, True],
                  "sm_100": [False, False, True, False, True, True],
                  "gfx942": [False, False, False, True, True, True], "gfx90a": [False, False, False, True, True, True]}
    assert static.select(builds, defaults_only=True) == [(i, True) for i in range(5)]


def _record(arch, **fields):
    base = {"kernel": "attn_fwd", "label": "fp16 x", "num_warps": 4, "num_stages": 2, "arch": arch, "dtype": "fp16",
            "default": True, "spills": 0, "shared_fits": True, "shared": 0, "shared_limit": 1, "mma": 1,
            "families": [80], "head_dim": 64}
    return dict(base, **fields)


@pytest.mark.parametrize("arch, ops, ok", [
    ("sm_80", {"HMMA": 4}, True), ("sm_90", {"HGMMA": 2, "HMMA": 1}, True), ("sm_90", {"HMMA": 4}, False),
    ("sm_100", {"UTCHMMA": 2}, True), ("sm_100", {"HMMA": 2}, False), ("gfx942", {"v_mfma_f32_16x16x16_f16": 8}, True),
])
def test_a_default_must_use_its_targets_own_mma(arch, ops, ok):
    """A dot kernel's default on sm_90 shows wgmma (HGMMA), on sm_100 tcgen05 (UTC*MMA), on AMD v_mfma."""
    found = static.problems(_record(arch, mma_ops=ops), calls_dot=True)
    assert (found == []) == ok, found
    assert static.problems(_record(arch, mma_ops=ops, default=False), calls_dot=True) == []  # candidates: any MMA
    assert static.problems(_record(arch, mma_ops=ops, families=[]), calls_dot=True) == []  # no family table
    assert "no tensor-core MMA" in static.problems(_record(arch, mma=0, mma_ops={}), calls_dot=True)[0]


def test_a_tma_default_must_load_through_tma():
    """A default built on tensor descriptors (its TMA constexpr on) shows UTMALDG on NVIDIA: a compiler that
    quietly lowered the descriptors to plain loads would keep the numbers and lose the point."""
    ops = {"HGMMA": 2}
    found = static.problems(_record("sm_90", mma_ops=ops, tma=True, UTMALDG=0), calls_dot=True)
    assert found == ["attn_fwd [fp16 x w4 s2] on sm_90: built on tensor descriptors but loads nothing through TMA "
                     "(no UTMALDG; default config)"]
    assert static.problems(_record("sm_90", mma_ops=ops, tma=True, UTMALDG=4), calls_dot=True) == []
    assert static.problems(_record("sm_90", mma_ops=ops, tma=True, UTMALDG=0, default=False), calls_dot=True) == []
    assert static.problems(_record("sm_90", mma_ops=ops, tma=False, UTMALDG=0), calls_dot=True) == []


def test_amd_spills_count_sgprs_too():
    assert static.problems(_record("gfx942", spills=3, mma_ops={"v_mfma_f32_16x16x16_f16": 1}), calls_dot=True) == \
        ["attn_fwd [fp16 x w4 s2] on gfx942: spills 3 registers (default config)"]


def test_the_quick_subset_holds_every_attention_specialisation_to_the_bar():
    """``--quick`` (and the registered-builds test below) compiles the fp16 defaults of each attention
    specialisation at head dims 64 and 128, the user mods' (mask_mod with its block mask, score_mod) included."""
    builds = static.load_builds(static.PROVIDER)
    chosen = [builds[i] for i, _ in static.select(builds, quick=True)]
    quick = {(b.kernel, b.dtype, b.head_dim, b.variant) for b in chosen}
    for kernel in ("attention_fwd", "attention_dkdv", "attention_dq"):
        for variant in ("window", "softcap", "alibi", "dropout", "varlen", "mask_mod", "score_mod"):
            for d in (64, 128):
                assert (kernel, "fp16", d, variant) in quick, (kernel, variant, d)


# ----------------------------------------------------------------------------------------------------------------
# The report on the tiny kernels.

def test_copy_compiles_without_spills_or_tensor_cores(tiny):
    for arch in BAR_ARCHS:
        rec = tiny["copy", arch]
        assert "error" not in rec, rec.get("error")
        assert 0 < rec["registers"] <= 255 and rec["spills"] == 0 and rec["stack"] == 0
        assert rec["mma"] == 0 and rec["LDG"] > 0 and rec["STG"] > 0 and rec["shared_fits"]
        assert rec["ctas_per_sm"] > 0 and rec["compile_s"] > 0


def test_fp16_dot_uses_each_architectures_tensor_cores(tiny):
    assert set(tiny["matmul", "sm_80"]["mma_ops"]) == {"HMMA"}
    # sm_90 gets wgmma (HGMMA) when num_warps is a multiple of 4 (whole warpgroups) and the M tile is at least 64
    # (N 16 and K 16 suffice, triton 3.8); a 32-row tile falls back to Ampere's mma.sync (HMMA), as do 2 warps.
    assert set(tiny["matmul", "sm_90"]["mma_ops"]) == {"HGMMA"}
    assert set(tiny["matmul_m32", "sm_90"]["mma_ops"]) == {"HMMA"}
    assert {op for op in tiny["matmul", "sm_100"]["mma_ops"] if not re.fullmatch(r"UTC\w*MMA", op)} == set()
    assert tiny["matmul", "sm_100"]["mma"] > 0
    amd = tiny["matmul", "gfx942"]
    assert amd["mfma"] == amd["mma"] > 0 and all(op.startswith("v_mfma") for op in amd["mma_ops"])
    assert amd["mfma"] > 0 and amd["vgpr_count"] > 0 and amd["vgpr_spill_count"] == amd["spills"] == 0
    assert amd["shared"] > 0 and amd["shared_fits"]


def test_spills_are_detected(tiny):
    # The zero-spill checks below would pass vacuously if spills went unseen.
    for arch in BAR_ARCHS:
        rec = tiny["register_hog", arch]
        assert rec["registers"] == 255 and rec["spill_stores"] > 0 and rec["spill_loads"] > 0
        assert rec["STL"] > 0 and rec["LDL"] > 0 and rec["stack"] > 0


def test_a_build_that_does_not_compile_is_reported_not_fatal(tiny):
    for arch in TINY_ARCHS:
        assert "arange" in tiny["broken", arch]["error"]


def test_a_worker_that_stops_leaves_error_records():
    records = static.run_report(archs=("sm_80",), provider="tests.test_static_build:shifting_builds", kernel="copy")
    assert len(records) == 1
    assert "exited with status 1" in records[0]["error"] and "registry changed order" in records[0]["error"]


def test_command_writes_table_and_records(tmp_path, capsys):
    status = static.main(["--provider", TINY, "--kernel", "copy", "--arch", "sm_80",
                          "--out", str(tmp_path)])
    assert status == 0
    records = json.loads((tmp_path / "builds.json").read_text())["records"]
    assert [(r["kernel"], r["arch"], r["default"]) for r in records] == [("copy", "sm_80", True)]
    assert "| copy | fp16 BLOCK=1024 | 4/1 | sm_80 |" in (tmp_path / "defaults.md").read_text()
    assert "1/1 (build, arch) pairs compiled" in capsys.readouterr().out
    assert static.main(["--provider", TINY, "--kernel", "broken", "--arch", "sm_80",
                        "--out", str(tmp_path)]) == 1


# ----------------------------------------------------------------------------------------------------------------
# The package's registered kernels: the bar, on the representative subset.

def _resolve(node, namespace):
    """The object a call's target (a name or a dotted attribute chain) refers to in ``namespace``, or None."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, namespace), node.attr, None)
    return None


def _calls_dot(fn, seen=None) -> bool:
    """Whether a kernel calls tl.dot, in its own body or in any @triton.jit helper it calls, at any depth (under any
    autotune/heuristics/jit wrappers)."""
    while not inspect.isfunction(fn):
        fn = fn.fn
    seen = set() if seen is None else seen
    if fn in seen:
        return False
    seen.add(fn)
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func, fn.__globals__)
        if target is tl.dot:
            return True
        if isinstance(target, (JITFunction, InterpretedFunction)) and _calls_dot(target, seen):
            return True
    return False


def _dot_kernels():
    return {b.kernel for b in static.load_builds(static.PROVIDER) if _calls_dot(b.fn)}


@triton.jit
def _dot_helper(a, b):
    return tl.dot(a, b)


@triton.jit
def _dot_in_a_helper(A, B, C, M: tl.constexpr):
    offsets = tl.arange(0, M)[:, None] * M + tl.arange(0, M)[None, :]
    tl.store(C + offsets, _dot_helper(tl.load(A + offsets), tl.load(B + offsets)))


def test_the_tensor_core_check_follows_helper_calls():
    assert _calls_dot(_dot_in_a_helper) and _calls_dot(matmul_kernel) and not _calls_dot(copy_kernel)
    dot_kernels = _dot_kernels()
    # The attention kernels call tl.dot only through their inner-loop helpers.
    assert {"attention_fwd", "attention_dkdv", "attention_dq"} <= dot_kernels
    assert not dot_kernels & {"attention_bwd_delta", "_softmax_fwd", "_softmax_bwd"}


def test_every_registered_build_belongs_to_a_checked_family():
    families = {static.describe(b)["family"] for b in static.load_builds(static.PROVIDER)}
    assert static.OTHER not in families and families == set(static.FAMILIES)


@pytest.fixture(scope="session")
def registered(tmp_path_factory, worker_id):
    records = _once_per_session(tmp_path_factory, worker_id, "registered", archs=BAR_ARCHS, quick=True,
                                defaults_only=True)
    dot_kernels = _dot_kernels()
    return [dict(r, calls_dot=r["kernel"] in dot_kernels) for r in records]


def _violations(records):
    return [problem for r in records for problem in static.problems(r, r["calls_dot"])]


def test_sm90_attention_defaults_load_through_tma_with_wgmma(registered):
    """sm_90's quick defaults of the three attention kernels (fp16, head dims 64 and 128, every specialisation) are
    built on tensor descriptors and compile to TMA loads (UTMALDG) and wgmma (HGMMA) without spilling; sm_80 runs
    none of them first (its family has no TMA)."""
    tma = [r for r in registered if r["tma"] and r["default"]]
    assert {(r["arch"], r["kernel"]) for r in tma} == {("sm_90", f"attention_{k}") for k in ("fwd", "dkdv", "dq")}
    assert {r["head_dim"] for r in tma} == {64, 128}
    assert {r["variant"] for r in tma} == {"", "window", "chunk", "softcap", "alibi", "sinks", "dropout", "varlen",
                                           "mask_mod", "score_mod"}
    assert [r["label"] for r in tma if not (r["UTMALDG"] > 0 and "HGMMA" in r["mma_ops"] and r["spills"] == 0)] == []


@pytest.mark.parametrize("family", list(static.FAMILIES))
def test_registered_kernels_meet_the_bar(registered, family):
    """Every registered kernel compiles for sm_80 and sm_90 (the builds those families try first), without
    spills, within the per-block shared memory, and with tensor-core MMA wherever it calls tl.dot in fp16/bf16."""
    records = [r for r in registered if r["family"] == family]
    assert {r["arch"] for r in records} == set(BAR_ARCHS)
    assert _violations(records) == []


def new_family_builds():
    """One build per family past sm_90 (the registered-kernels check runs sm_80/sm_90's quick set): the plain
    fp16 forward default at head dim 128 of sm_100 and of gfx942 (the child process imports it by name)."""
    return [b for b in static.load_builds(static.PROVIDER) if b.kernel == "attention_fwd"
            and (b.dtype, b.head_dim, b.variant) == ("fp16", 128, "") and set(b.families) & {100, "gfx942"}]



def test_each_new_familys_forward_default_meets_its_bar(tmp_path_factory, worker_id):
    """sm_100's default forward compiles to tcgen05 (UTC*MMA) and gfx942's to v_mfma, spill-free (no SGPR or VGPR
    spill on AMD) and within shared memory / 64 KiB of LDS: one build each, to keep the quick check quick."""
    records = _once_per_session(tmp_path_factory, worker_id, "new-families", archs=("sm_100", "gfx942"),
                                provider="tests.test_static_build:new_family_builds", defaults_only=True)
    assert sorted(r["arch"] for r in records) == ["gfx942", "sm_100"] and all(r["default"] for r in records)
    assert [p for r in records for p in static.problems(r, calls_dot=True)] == []
    # sm_100's default is built on tensor descriptors: TMA loads feeding tcgen05
    assert [(r["tma"], r["UTMALDG"] > 0) for r in records if r["arch"] == "sm_100"] == [(True, True)]


def decode_16bit_builds():
    """The decode attention kernel's fp16/bf16 defaults at head dims 64 and 128, every family's tile (the child
    process imports it by name)."""
    return [b for b in static.load_builds(static.PROVIDER) if b.kernel == "attention_decode"
            and b.dtype in ("fp16", "bf16") and b.head_dim in (64, 128)]


def test_decode_defaults_meet_the_bar_on_sm100_and_gfx942(tmp_path_factory, worker_id):
    """The decode kernel's 16-bit defaults at head dims 64 and 128 (16 and the largest packed-row block, with and
    without a left window), each compiled for the families that launch it: gfx942's own tiles spill no SGPR or
    VGPR (NVIDIA's spilled 2-69 SGPRs there), sm_100 runs NVIDIA's spill-free. sm_80/sm_90: the registered check."""
    records = _once_per_session(tmp_path_factory, worker_id, "decode-families", archs=("sm_100", "gfx942"),
                                provider="tests.test_static_build:decode_16bit_builds", defaults_only=True)
    per_arch = {arch: [r for r in records if r["arch"] == arch] for arch in ("sm_100", "gfx942")}
    assert {arch: len(recs) for arch, recs in per_arch.items()} == {"sm_100": 16, "gfx942": 16}
    assert all(r["default"] for r in records) and all(r["families"] == ["gfx942"] for r in per_arch["gfx942"])
    assert [p for r in records for p in static.problems(r, calls_dot=True)] == []


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_every_attention_default_of_a_family_meets_its_bar(family):
    """Every attention default (each dtype, head dim and specialisation) that a family's GPUs try first, compiled
    for that family's target (sm_80, sm_90, sm_100, gfx942): the bar of ``python -m benchmarks static --arch ARCH
    --kernel attention --defaults``. Decode's too: its attention kernel on the family's own tile, its combine,
    append and index check (one config for every family). Minutes per family."""
    records = static.run_report(archs=(FAMILY_ARCHS[family],), kernel="attention", defaults_only=True)
    dot_kernels = _dot_kernels()
    assert records and all(r["default"] for r in records)
    # the known misses (configs.py, the fp32 tables' comment): gfx942's fp32 dK/dV d256 with a window, chunk,
    # softcap, dropout or mask mod spills a few SGPRs into VGPR lanes, never a VGPR or scratch (every tile tried
    # spills more)
    known = [r for r in records if r["arch"] == "gfx942" and r["kernel"] == "attention_dkdv"
             and (r["dtype"], r["head_dim"]) == ("fp32", 256) and r["variant"] in KNOWN_GFX942_SPILLS]
    assert all(r["vgpr_spill_count"] == r["private_segment_fixed_size"] == 0 for r in known)
    found = [p for r in records if r not in known for p in static.problems(r, r["kernel"] in dot_kernels)]
    assert found == []


KNOWN_GFX942_SPILLS = ("window", "chunk", "softcap", "dropout", "mask_mod")
