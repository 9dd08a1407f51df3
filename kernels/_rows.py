"""Launch helpers shared by the row-wise kernels (softmax, layer/RMS norm): block, warps and the GPU family's lanes.

Tile table per GPU family: the row kernels' best choice differs by the width of a warp, not by the NVIDIA
generation. sm_80, sm_90 and sm_100 share one table (32-lane warps, the same 64K-register file per SM and 255
registers a thread, so the same block compiles spill-free on all three: ``python -m benchmarks static``); AMD
CDNA3 (gfx942) runs 64-lane wavefronts, so the same elements per thread, and the same 128-bit vector loads, take
half the warps there. The SM count (the persistent grids' size) is asked of the device at launch.
"""
import functools

import torch

from kernels._runtime import next_power_of_2

PLAN_CACHE_SIZE = 4096
"""Entries each row kernel's launch-plan cache keeps (least recently used dropped): far more widths than a
process's models use, a bound for one that sees a new width per call (attention's plan cache has the same)."""

NVIDIA_FAMILIES = (80, 90, 100)
"""``Build.families`` of the NVIDIA table: the build report (``--defaults``) holds its defaults to the bar on
sm_80, sm_90 and sm_100."""
AMD_FAMILY = "gfx942"
"""``Build.families`` name of the AMD CDNA3 table (the build report's family of gfx942 and gfx90a), held to its
bar on AMD only."""
LANES = {NVIDIA_FAMILIES: 32, (AMD_FAMILY,): 64}
"""Threads per warp (wavefront) of each table, by its ``Build.families``."""


def lanes_of(device: torch.device) -> int:
    """Threads per warp on ``device``'s GPU family: 64 on ROCm (CDNA wavefronts), else 32. Asked at launch, never
    at import."""
    return 64 if device.type == "cuda" and torch.version.hip else 32


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def row_config(n_cols: int, max_block: int, long_block: int, per_thread: int, lanes: int = 32):
    """(BLOCK, SINGLE, num_warps) for one program per row of ``n_cols`` elements: a power-of-two block covering
    the row when it has at most ``max_block`` elements, else ``long_block``-wide chunks looped over; 128 to 512
    threads in warps of ``lanes``, about ``per_thread`` elements of a block per thread (fewer where the kernel keeps
    more values per element). Cached: a launch plan is computed once per width, set of limits and family (the
    most recent PLAN_CACHE_SIZE of them: a stream of distinct widths does not grow the cache without bound)."""
    single = n_cols <= max_block
    block = next_power_of_2(n_cols) if single else long_block
    return block, single, warps_for(block, per_thread, lanes)


def warps_for(elements: int, per_thread: int, lanes: int = 32) -> int:
    """Warps of ``lanes`` threads for a block of ``elements``: about ``per_thread`` elements a thread, 128 to 512
    threads."""
    return min(512 // lanes, max(128 // lanes, elements // (lanes * per_thread)))


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a (rows, n_cols) matrix with unit column stride: a view when possible, else a copy."""
    rows = t.view(-1, n_cols) if t.is_contiguous() else t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rows_and_stride(t: torch.Tensor, n_cols: int):
    """(``t`` as rows of ``n_cols`` elements with unit column stride, its row stride). A contiguous ``t`` already is
    that matrix in memory: it goes to the kernel as it is (a kernel reads a pointer and a row stride), with no view
    to build per call; else :func:`as_rows`."""
    if t.is_contiguous():
        return t, n_cols
    rows = as_rows(t, n_cols)
    return rows, rows.stride(0)


def empty_rows_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``t``'s shape and dtype (rows written at ``row * n_cols``).
    ``empty_like`` keeps a contiguous layout and costs half of ``empty(shape, ...)`` on the host."""
    return torch.empty_like(t) if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)


AUTOCAST_FP32_DEVICES = ("cuda",)
"""Device types whose autocast runs torch's softmax, log_softmax, layer_norm and rms_norm in fp32 (they are on
CUDA's fp32 list; CPU autocast leaves them in their input's dtype)."""


def autocasts_to_fp32(x: torch.Tensor) -> bool:
    """Whether torch's own softmax or norm would take ``x`` up to fp32 here, as autocast does for the ops of its
    fp32 list."""
    if x.dtype not in _HALF_DTYPES:
        return False
    for device_type in AUTOCAST_FP32_DEVICES:  # autocast's flag first: x.device.type builds a device and a string
        if torch.is_autocast_enabled(device_type) and x.device.type == device_type:
            return True
    return False


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtensor_class():
    """torch's DTensor class; None where torch is built without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor  # (kernels.distributed imports it anyway)
    return DTensor


DTENSOR = _dtensor_class()
"""torch's DTensor class or None, looked up at import: a lookup on first use mutated a global inside the first
traced call, which torch.compile refuses inside a higher-order op (a gradient-checkpointed layer)."""
