"""Tile families per GPU (sm_80, sm_90, sm_100, gfx942): which family a GPU runs, the tables' short-sequence
pruning, and the counted FLOPs/bytes taken with each family's default tiles. The build report holds each family's
defaults to its target's bar (tests/test_static_build.py)."""
import contextlib

import pytest
import torch

from benchmarks import runner
from benchmarks.counting import counting
from benchmarks.providers import Case
from kernels import _runtime
from kernels.attention import configs
from test_attention import _check_gradients, _inputs  # (at import: its _REFERENCE is the real one, not a fixture's)


@pytest.fixture
def fresh_family_cache():
    configs._device_family.cache_clear()
    yield
    configs._device_family.cache_clear()


@pytest.mark.parametrize("capability, family", [((8, 0), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 100),
                                                ((10, 3), 100), ((12, 0), 90)])
def test_an_nvidia_gpu_runs_its_capabilitys_family(monkeypatch, fresh_family_cache, capability, family):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_runtime, "device_capability", lambda device: capability)
    assert configs.device_family(torch.device("cuda", 0)) == family


@pytest.mark.parametrize("arch", ["gfx942:sramecc+:xnack-", "gfx90a:sramecc+:xnack-", "gfx1100"])
def test_an_amd_gpu_runs_the_gfx942_tables(monkeypatch, fresh_family_cache, arch):
    """AMD GPUs are torch.cuda devices under a HIP build of torch, told apart by gcnArchName; all run MI300's."""
    class Properties:
        gcnArchName = arch

    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties)
    monkeypatch.setattr(_runtime, "device_capability", lambda device: pytest.fail("asked an AMD GPU for SM"))
    assert configs.device_family(torch.device("cuda", 1)) == configs.AMD == "gfx942"


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_each_family_has_every_table_and_short_tiles(family):
    assert set(configs.FAMILIES) == {80, 90, 100, "gfx942"}
    for kernel in configs.KERNELS:
        for d in (64, 128, 256):
            for fp32 in (False, True):
                for variant in ("",) + tuple(configs._VARIANTS):
                    table = configs.tiles(kernel, family, d, fp32, variant)
                    assert table and len(set(table)) == len(table), (kernel, d, fp32, variant)
                    block = configs._GRID_INDEX[kernel]
                    assert any(t[block] <= configs.SHORT_BLOCK for t in table), (kernel, family, d, fp32, variant)
    # gfx942: a wave64 target with 64 KiB of LDS streams 16-wide blocks (wider ones spill SGPRs)
    if family == configs.AMD:
        assert {t[1] for t in configs.tiles("fwd", family, 128, False)} == {16}


@pytest.mark.parametrize("kernel, lengths, short", [("fwd", (512, 512), True), ("fwd", (1024, 8192), True),
                                                     ("fwd", (2048, 512), False), ("dq", (512, 4096), True),
                                                     ("dkdv", (4096, 512), True), ("dkdv", (512, 4096), False)])
def test_short_sequences_autotune_over_short_tiles_only(kernel, lengths, short):
    """Up to 1k rows in the grid's direction (queries for the forward and dQ, keys for dK/dV) the autotuner sees
    only tiles of at most 64 grid rows, so a 512-token causal launch is never left with 128-row blocks; longer
    ones see the whole table, in its order (the default first)."""
    for family in configs.FAMILIES:
        table = configs.tiles(kernel, family, 128, False)
        buckets = tuple(configs._length_bucket(n) for n in lengths)
        tuned = configs._tuned(kernel, family, 128, False, "", buckets)
        got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs]
        block = configs._GRID_INDEX[kernel]
        if short:
            assert got == [t for t in table if t[block] <= configs.SHORT_BLOCK], family
        else:
            assert got == table, family
    assert configs._tuned("fwd", 90, 128, False, "", (512, 512)).configs[0].kwargs["BLOCK_M"] == 64


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_counts_run_each_familys_default_tiles(monkeypatch, family):
    """benchmarks' counted FLOPs/bytes can be taken with any family's default tiles: the launches that the count
    sees run exactly ``default_configs(family)``, and the note names the family."""
    if not _runtime.INTERPRETED:
        pytest.skip("counting intercepts interpreted kernels only")
    launched = {}
    real = dict(configs.KERNELS)

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def run(self, *args, grid, warmup, **kwargs):
            launched.setdefault(self.kernel, set()).add((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return real[self.kernel].run(*args, grid=grid, warmup=warmup, **kwargs)

    for kernel in real:
        monkeypatch.setitem(configs.KERNELS, kernel, Spy(kernel))
    case = Case("attention", "fwd+bwd", 80, dtype="float16", heads=1, head_dim=64)
    q, k, v = (torch.randn(case.shape, dtype=torch.float16, requires_grad=True) for _ in range(3))
    context, tiles = runner._count_tiles(case, family)
    import kernels

    with counting() as counts, context:
        kernels.attention(q, k, v, causal=True).sum().backward()
    expected = {name.removeprefix("attention_"): (c["BLOCK_M"], c["BLOCK_N"])
                for name, c in configs.default_configs(family, torch.float16, 64).items()}
    assert tiles == expected
    assert launched == {kernel: {tile} for kernel, tile in expected.items()}
    assert counts.flops > 0 and counts.bytes > 0
    target = family if isinstance(family, str) else f"sm_{family}"
    assert runner.tiles_note(tiles, family).startswith(f"counted with {target} default tiles")


@pytest.mark.parametrize("family", [100, "gfx942"])
@pytest.mark.parametrize("n", [70, 1100])
def test_new_familys_default_tiles_obey_the_float64_rule(attention_kernel_only, monkeypatch, device, family, n):
    """sm_100's and gfx942's first tiles for a short (pruned) and a long launch, forced on the interpreted kernels,
    at an awkward shape (partial blocks, GQA, padded head dim 80, a key padding mask): forward and gradients
    against float64, each kernel launched with its forced tile. The long case runs a few rows against 1100 keys,
    so dK/dV's grid is long too."""
    from kernels.registry import use_config

    n_q = 70 if n == 70 else 40
    q, k, v = _inputs(1, 2, 1, n_q, n, 80, torch.bfloat16, device, requires_grad=True)
    key_padding_mask = torch.arange(n, device=device)[None, :] < n - 9
    tiles = {kernel: configs.prune(kernel, configs.tiles(kernel, family, 128, False), (n_q, n))[0]
             for kernel in configs.KERNELS}
    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel, self.real = kernel, configs.KERNELS[kernel]

        def run(self, *args, **kwargs):
            launched.append((self.kernel, kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return self.real.run(*args, **kwargs)

    for kernel in configs.KERNELS:
        monkeypatch.setitem(configs.KERNELS, kernel, Spy(kernel))
    with contextlib.ExitStack() as stack:
        for kernel, (bm, bn, warps, stages) in tiles.items():
            stack.enter_context(use_config(f"attention_{kernel}", BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                           num_stages=stages))
        _check_gradients(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    assert sorted(launched) == sorted((kernel, bm, bn) for kernel, (bm, bn, _, _) in tiles.items())
