"""One recorder of the aten ops a block of code runs, for the host-path tests: what a call allocates and computes
on the host (views and allocations told apart, so a test can ask for either)."""
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = ("empty", "empty_strided", "empty_like")


class AtenOps(TorchDispatchMode):
    """Every aten op run inside the block, in order: ``names`` of all of them, ``work`` of those that are
    neither views nor allocations, ``allocated(dtype)`` the shapes of the ``dtype`` tensors allocated."""

    def __init__(self):
        super().__init__()
        self.names: List[str] = []
        self.work: List[str] = []
        self._allocations: List[Tuple[torch.dtype, Tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        out = func(*args, **(kwargs or {}))
        if name in ALLOCATIONS:  # (dtype, shape) only: holding the tensors would change what the block runs
            self._allocations.append((out.dtype, tuple(out.shape)))
        elif not func.is_view:
            self.work.append(name)
        return out

    def allocated(self, dtype: torch.dtype) -> List[Tuple[int, ...]]:
        return [shape for allocated_dtype, shape in self._allocations if allocated_dtype == dtype]
