"""Counted bytes and FLOPs: what a computation reads, writes and multiplies, independent of any device's speed.

Two counters run together inside :func:`counting`:

- Triton kernels (only when they run in the interpreter, which executes every load and store one program
  instance at a time): the interpreter's builder ops for loads, stores and atomics are wrapped to add the bytes of
  the lanes whose mask is on (masked-off lanes move no memory on a GPU either), and ``tl.dot`` adds 2*M*N*K.
  Every executed load counts, so a K/V tile re-read by each query block counts each time, as it would from HBM
  (or L2) on a GPU. With ``counting(rereads=True)`` each launch also tracks the addresses it loads: ``reread``
  is the bytes of loads from an address the same launch had already loaded (the parameters every norm program
  reads, a K/V tile each query block reads), which a GPU serves from L2 wherever the data re-read fits there;
  ``bytes - reread`` is then the launch's compulsory traffic, every address once.
- PyTorch ops: a ``TorchDispatchMode`` sees every aten op (forward and backward), adding the bytes of its tensor
  inputs (read) and outputs (written) and the matmul/SDPA FLOPs of ``torch.utils.flop_counter``'s formulas. Views
  and allocations without initialisation move nothing. A fused op (e.g. CPU SDPA) is opaque: only its own
  inputs and outputs count (``Counts.opaque_ops`` says how many such ops a count holds). A custom op
  (``torch.library``) that launches Triton kernels counts through those kernels instead; the aten ops inside it
  run below the mode and are not seen (in practice: output allocations).
"""
import contextlib
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from kernels import INTERPRETED

aten = torch.ops.aten


@dataclass
class Counts:
    """Bytes read and written and FLOPs counted, with the number of Triton launches and aten ops seen."""

    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0
    triton_launches: int = 0
    aten_ops: int = 0
    reread: int = 0
    """Bytes of Triton loads from addresses the same launch loaded before (tracked under ``rereads=True``)."""
    opaque_ops: int = 0
    """Fused ops seen only from outside (torch's SDPA, a custom op without Triton kernels, e.g. flash-attn): their
    inputs and outputs count, their inner traffic does not, and SDPA's FLOPs are torch's non-causal formula (a
    custom op's: none). Non-zero means the counts are a floor, not the work."""

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def compulsory(self) -> int:
        """Bytes with each launch's re-reads taken out: every address a launch loads, once (``rereads=True``)."""
        return self.bytes - self.reread

    def as_record(self) -> dict:
        return {**asdict(self), "bytes": self.bytes}


# ---- Triton, through the interpreter -------------------------------------------------------------------------

def _itemsize(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _active_lanes(ptrs, mask) -> int:
    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


def _active_addresses(ptrs, mask) -> np.ndarray:
    """The addresses of the lanes whose mask is on, flat."""
    addresses = np.asarray(ptrs.data).ravel()
    return addresses if mask is None else addresses[np.broadcast_to(mask.data, np.shape(ptrs.data)).ravel()]


class _LoadedAddresses:
    """The addresses one launch loads, by element size: its re-read bytes are its loaded bytes less the bytes of
    the distinct addresses."""

    def __init__(self):
        self.by_size, self.loaded = {}, 0

    def add(self, ptrs, mask) -> None:
        itemsize = _itemsize(ptrs)
        addresses = _active_addresses(ptrs, mask)
        self.by_size.setdefault(itemsize, []).append(addresses)
        self.loaded += addresses.size * itemsize

    def reread_bytes(self) -> int:
        distinct = sum(np.unique(np.concatenate(chunks)).size * itemsize for itemsize, chunks in self.by_size.items())
        return self.loaded - distinct


def _triton_wrappers(counts: Counts, builder, launch_loads: Optional[List[_LoadedAddresses]]):
    """Wrapped builder methods; unmasked loads/stores and tensor-descriptor ops all reach the masked ones.
    ``launch_loads``: where the running launch records its loaded addresses (its last entry), or None."""
    load, store, dot = builder.create_masked_load, builder.create_masked_store, builder.create_dot
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def create_masked_load(ptrs, mask, *args, **kwargs):
        counts.bytes_read += _active_lanes(ptrs, mask) * _itemsize(ptrs)
        if launch_loads:
            launch_loads[-1].add(ptrs, mask)
        return load(ptrs, mask, *args, **kwargs)

    def create_masked_store(ptrs, value, mask, *args, **kwargs):
        counts.bytes_written += _active_lanes(ptrs, mask) * _itemsize(ptrs)
        return store(ptrs, value, mask, *args, **kwargs)

    def create_dot(a, b, *args, **kwargs):
        m_rows, k = int(np.prod(np.shape(a.data)[:-1])), np.shape(a.data)[-1]
        counts.flops += 2 * m_rows * k * np.shape(b.data)[-1]
        return dot(a, b, *args, **kwargs)

    def create_atomic_rmw(op, ptr, val, mask, *args, **kwargs):
        nbytes = _active_lanes(ptr, mask) * _itemsize(ptr)
        counts.bytes_read += nbytes
        counts.bytes_written += nbytes
        return rmw(op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(ptr, *args, **kwargs):
        nbytes = _active_lanes(ptr, None) * _itemsize(ptr)
        counts.bytes_read += nbytes
        counts.bytes_written += nbytes
        return cas(ptr, *args, **kwargs)

    return {fn.__name__: fn for fn in (create_masked_load, create_masked_store, create_dot, create_atomic_rmw,
                                       create_atomic_cas)}


@contextlib.contextmanager
def _count_triton(counts: Counts, rereads: bool):
    if not INTERPRETED:  # compiled kernels run on the GPU where nothing can be intercepted
        yield
        return
    from triton.runtime import interpreter

    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    launch = executor.__call__
    launch_loads = [] if rereads else None

    def counted_launch(self, *args, **kwargs):
        counts.triton_launches += 1
        if rereads:
            launch_loads.append(_LoadedAddresses())
        # The interpreter's own host copies of the arguments are aten ops too; they are not the kernel's traffic.
        try:
            with _disable_current_modes():
                return launch(self, *args, **kwargs)
        finally:
            if rereads:
                counts.reread += launch_loads.pop().reread_bytes()

    wrappers = _triton_wrappers(counts, builder, launch_loads)
    for name, fn in wrappers.items():
        setattr(builder, name, fn)  # instance attributes shadow the class methods the semantic layer calls
    executor.__call__ = counted_launch
    try:
        yield
    finally:
        executor.__call__ = launch
        for name in wrappers:
            delattr(builder, name)


# ---- PyTorch, through a dispatch mode ------------------------------------------------------------------------

_NO_TRAFFIC = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
               aten._unsafe_view, aten.set_, aten.resize_, aten.lift_fresh}
_FUSED_ATTENTION = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")
"""Name prefixes of aten's fused attention ops (SDPA's backends, forward and backward): opaque to this count."""
_OVERWRITES_FIRST = {aten.copy_, aten.fill_, aten.zero_}  # their destination is written, not read
# CPU SDPA has its own ops; they take the same leading (query, key, value) arguments as the CUDA flash ones.
_FLOP_ALIASES = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
}


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor spans: broadcast (stride-0) dims are one element, not ``size`` copies."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        elements *= size if stride != 0 or size == 0 else 1
    return elements * t.element_size()


def _tensors(tree):
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        launches = self.counts.triton_launches
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if func.is_view or packet in _NO_TRAFFIC:
            return out
        if func.namespace != "aten" and self.counts.triton_launches > launches:
            return out  # a custom op around Triton kernels: their own loads and stores were counted instead
        if func.namespace != "aten" or packet.__name__.startswith(_FUSED_ATTENTION):
            self.counts.opaque_ops += 1
        read_args = args[1:] if packet in _OVERWRITES_FIRST else args
        read_kwargs = {name: value for name, value in kwargs.items() if name != "out"}
        self.counts.aten_ops += 1
        self.counts.bytes_read += sum(touched_bytes(t) for t in _tensors((read_args, read_kwargs)))
        self.counts.bytes_written += sum(touched_bytes(t) for t in _tensors(out))
        formula = flop_registry.get(_FLOP_ALIASES.get(packet, packet))
        if formula is not None:
            self.counts.flops += int(formula(*args, **kwargs, out_val=out))
        return out


@contextlib.contextmanager
def counting(rereads: bool = False):
    """Count everything run inside the block: ``with counting() as counts: f(x)``, then read ``counts``.
    ``rereads``: also track each Triton launch's re-read bytes (``Counts.reread``; costs a record of every
    loaded address, so small inputs only)."""
    counts = Counts()
    with _count_triton(counts, rereads), _AtenCounter(counts):
        yield counts
