"""The decode kernel's tile per GPU family (kernels/attention/decode.py): ``tile()`` takes the family's entry, a GPU
launch its device's family (an interpreted one the assumed H100's), the split heuristic counts that family's key
block, and the registered builds mark each family's tile default for that family alone, so the build report holds
each family's defaults to its own target's no-spill bar (tests/test_static_build.py)."""
import pytest
import torch

from kernels import _runtime
from kernels.attention import configs, decode
from kernels.registry import TRITON_DTYPES, use_config

FP16 = torch.float16
DTYPES = list(TRITON_DTYPES)


@pytest.fixture
def fresh_plans():
    """_attend_plan's cache keys on the call's signature, not on the family: no plan crosses a patched test."""
    decode._attend_plan.cache_clear()
    yield
    decode._attend_plan.cache_clear()


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The launch code as a GPU runs it (warps, stages, the family's key block), on CPU tensors: nothing launches."""
    monkeypatch.setattr(_runtime, "INTERPRETED", False)


def test_every_family_has_a_tile_for_each_dtype_and_head_dim():
    assert set(decode._TILES) == set(configs.FAMILIES)
    for table in decode._TILES.values():
        assert {fp32: set(by_dim) for fp32, by_dim in table.items()} == {False: {64, 128, 256}, True: {64, 128, 256}}


NVIDIA_TILES = {  # (BLOCK_N, num_warps, num_stages) by head dim: 16-bit, then fp32 (smaller: operands in registers)
    "16-bit": {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)},
    "fp32": {64: (32, 4, 2), 128: (16, 4, 2), 256: (16, 4, 2)},
}
GFX942_ONE_STAGE = {("16-bit", 64), ("16-bit", 128), ("fp32", 64)}  # 16 keys on one stage; the rest NVIDIA's
MAX_BLOCK_M = {"16-bit": {64: 64, 128: 32, 256: 16}, "fp32": {64: 32, 128: 16, 256: 16}}


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_each_familys_tile_for_every_dtype_and_head_dim(on_a_gpu, family):
    """The NVIDIA families share one table; gfx942 streams 16 keys on one stage at 16-bit d64/d128 and fp32 d64,
    and takes NVIDIA's tiles elsewhere. bf16 takes fp16's tile; a head dim takes its padded bucket's (40: d64, 200:
    d256); BLOCK_M is the smallest power of two >= 16 that holds the rows (5: 16, 20: 32), capped per bucket."""
    for dtype in DTYPES:
        kind = "fp32" if dtype == torch.float32 else "16-bit"
        for head_dim, bucket in ((40, 64), (128, 128), (200, 256)):
            one_stage = family == configs.AMD and (kind, bucket) in GFX942_ONE_STAGE
            block_n, warps, stages = (16, 4, 1) if one_stage else NVIDIA_TILES[kind][bucket]
            for rows, block_m in ((5, 16), (20, 32)):
                block_m = min(block_m, MAX_BLOCK_M[kind][bucket])
                assert decode.tile(dtype, head_dim, rows, family) == (
                    dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages), block_n), \
                    (dtype, head_dim, rows)


def test_gfx942_takes_one_stage_where_nvidias_tiles_spill_sgprs(on_a_gpu):
    """fp16 d64 and d128: 16 keys on one stage (NVIDIA: 64 on three; wider blocks spill SGPRs with triton 3.9);
    d256 as NVIDIA's."""
    def gpu_tile(head_dim, family):
        config, _ = decode.tile(FP16, head_dim, 8, family)
        return config["BLOCK_N"], config["num_warps"], config["num_stages"]

    assert [gpu_tile(d, configs.AMD) for d in (64, 128, 256)] == [(16, 4, 1), (16, 4, 1), (32, 4, 2)]
    for family in configs.NVIDIA:
        assert [gpu_tile(d, family) for d in (64, 128, 256)] == [(64, 4, 3), (64, 4, 3), (32, 4, 2)]


def test_interpreted_tile_keeps_the_interpreters_block_and_reports_the_familys():
    config, gpu_block_n = decode.tile(FP16, 64, 4, configs.AMD)
    assert config == dict(BLOCK_M=16, BLOCK_N=decode.INTERPRETER_BLOCK_N) and gpu_block_n == 16
    assert decode.tile(FP16, 64, 4, 90)[1] == decode.tile(FP16, 64, 4, decode.ASSUMED_FAMILY)[1] == 64  # H100


def test_a_forced_config_wins_over_the_familys(on_a_gpu):
    with use_config("attention_decode", BLOCK_N=32, num_warps=8):
        assert decode.tile(FP16, 64, 4, configs.AMD) == (dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1), 32)


def _plan(capacity: int):
    """The plan of one fp16 d64 decode step: B=2, 2 query heads on 2 kv heads, Sq=1, a CPU device."""
    return decode._attend_plan((2, 1, 2, 64), FP16, torch.device("cpu"), 2, capacity, 0, 2, 0, (-1, -1), 0.0,
                               0.125, 0, False, None)


@pytest.mark.parametrize("family, block_n, stages, splits", [(configs.AMD, 16, 1, 2), (80, 64, 3, 1),
                                                             (100, 64, 3, 1)])
def test_a_gpu_launch_takes_its_devices_family(on_a_gpu, fresh_plans, monkeypatch, family, block_n, stages, splits):
    """The launch asks its device's family (configs.device_family) and takes that table's tile; the split heuristic
    counts the same key block: a 64-key cache is four of gfx942's 16-key blocks (split in two, as far as the
    partials' traffic allows), one of NVIDIA's."""
    monkeypatch.setattr(decode, "device_family", lambda device: family)
    plan = _plan(64)
    assert (plan.meta["BLOCK_N"], plan.meta["num_warps"], plan.meta["num_stages"]) == (block_n, 4, stages)
    assert plan.splits == splits == decode.choose_splits(4, 1, 64, 64, 2, block_n, decode.ASSUMED_SMS)


def test_an_interpreted_launch_assumes_its_family_without_asking_a_gpu(fresh_plans, monkeypatch):
    monkeypatch.setattr(decode, "device_family", lambda device: pytest.fail("asked a device for its family"))
    plan = _plan(64)
    assert plan.meta["BLOCK_N"] == decode.INTERPRETER_BLOCK_N and plan.splits == 1  # one of H100's 64-key blocks


def test_each_familys_tile_is_its_registered_default():
    """For each family, dtype and head dim, the attention kernel's builds marked for that family are its table's
    tile, at 16 and the largest BLOCK_M, with and without a left window, all defaults."""
    builds = [b for b in decode._builds() if b.kernel == "attention_decode"]
    for family in configs.FAMILIES:
        for dtype, name in TRITON_DTYPES.items():
            fp32 = dtype == torch.float32
            for d in (64, 128, 256):
                mine = [b for b in builds if family in b.families and (b.dtype, b.head_dim) == (name, d)]
                assert {(b.constexprs["BLOCK_N"], b.num_warps, b.num_stages) for b in mine} == \
                    {decode._TILES[family][fp32][d]}, (family, name, d)
                shapes = sorted((b.constexprs["BLOCK_M"], b.constexprs["LOCAL_LEFT"]) for b in mine)
                assert shapes == sorted((m, w) for m in {16, decode._MAX_BLOCK_M[fp32][d]} for w in (False, True))
                assert all(b.default for b in mine)
