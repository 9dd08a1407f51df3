"""Launch helpers shared by the row-wise kernels (softmax, layer/RMS norm): one program per row."""
import functools

import torch

from kernels._runtime import next_power_of_2


@functools.lru_cache(maxsize=None)
def row_config(n_cols: int, max_block: int, long_block: int, per_thread: int):
    """(BLOCK, SINGLE, num_warps) for one program per row of ``n_cols`` elements: a power-of-two block covering
    the row when it has at most ``max_block`` elements, else ``long_block``-wide chunks looped over; 4 to 16 warps,
    about ``per_thread`` elements of a block per thread (fewer where the kernel keeps more values per element).
    Cached: a launch plan is computed once per width and set of limits."""
    single = n_cols <= max_block
    block = next_power_of_2(n_cols) if single else long_block
    num_warps = min(16, max(4, block // (32 * per_thread)))
    return block, single, num_warps


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a (rows, n_cols) matrix with unit column stride: a view when possible, else a copy."""
    rows = t.view(-1, n_cols) if t.is_contiguous() else t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()
