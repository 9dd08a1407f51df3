"""Catch host reads of tensor values (each one a GPU sync, and fatal inside CUDA-graph capture) on a CPU machine.

:func:`host_reads` wraps the ``torch.Tensor`` methods that copy a value to Python (``item``, ``tolist``,
``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``numpy``) and ``nonzero``, and records each call whose
caller is this project's code (``kernels/`` or ``transformer/``); Triton's interpreter and torch's own internals
read values too, and are not ours. On a CUDA machine ``torch.cuda.set_sync_debug_mode("error")`` would say it
directly; this works where every tensor is on the CPU.
"""
import contextlib
import os
import sys
from typing import Iterator, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = tuple(os.path.join(ROOT, package) + os.sep for package in ("kernels", "transformer"))
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")
DEVICE_CHECK = ("_validate.py", "assert_on_device")
"""The one seam allowed to read: ``kernels._validate.assert_on_device`` reads CPU tensors only (no sync there) and
hands CUDA ones to ``torch._assert_async``."""


@contextlib.contextmanager
def host_reads() -> Iterator[List[str]]:
    """Inside the block, a list of ``"file:line function: method"`` for each value read our code made."""
    seen: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            code = caller.f_code
            if code.co_filename.startswith(OURS) and (os.path.basename(code.co_filename), code.co_name) != DEVICE_CHECK:
                seen.append(f"{os.path.relpath(caller.f_code.co_filename, ROOT)}:{caller.f_lineno} "
                            f"{caller.f_code.co_name}: Tensor.{name}")
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def assert_no_host_reads(call) -> None:
    """Run ``call()`` and fail, listing them, if our code read any tensor value on the host."""
    with host_reads() as seen:
        call()
    assert not seen, "host reads of tensor values:\n" + "\n".join(seen)
