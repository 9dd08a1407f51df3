"""User-defined masks and scores for :func:`kernels.attention`, in the spirit of PyTorch's FlexAttention.

A *mask mod* is a ``@triton.jit`` function ``mask_mod(b, h, q_idx, kv_idx, *extra) -> bool tile`` and a *score mod*
one ``score_mod(score, b, h, q_idx, kv_idx, *extra) -> score tile`` with its elementwise derivative
``grad(score, b, h, q_idx, kv_idx, *extra) = d score_mod / d score`` for the backward. The kernels evaluate them on
tiles: ``b``, ``h`` (batch, query head) are scalars, ``q_idx``/``kv_idx`` broadcastable index tensors of absolute
positions (a (BLOCK_M, 1) column and a (1, BLOCK_N) row, transposed in the dK/dV kernel: mods must be
elementwise), clamped into [0, Nq) x [0, Nk) so they may index per-position tensors without masks; ``score`` is
the fp32 scaled score ``scale * q . k`` (the score mod runs before softcap and ALiBi). ``extra`` are the tensors
and int/float scalars given to :class:`MaskMod`/:class:`ScoreMod`; gradients w.r.t. extra tensors are not
computed.

:func:`create_block_mask` summarises a mask mod per MASK_BLOCK x MASK_BLOCK cell (128 x 128; every kernel tile
lies in one cell) as empty, partial or full with one Triton launch. The attention kernels skip empty cells (K/V
never loaded), run full cells without evaluating the mod, and evaluate it only in partial cells; the summary is
computed once and reused by the backward and by every call given the same :class:`BlockMask`.

Through ``torch.compile``: custom ops cannot take Python callables, so a mod travels through the op as an int key
into :data:`_REGISTRY` (its functions and scalars: equal mods share a key, so a per-step ``document_mask(ids)``
neither grows the registry nor recompiles) plus its extra tensors as a ``Tensor[]``. Values that change from call
to call belong in tensors: each distinct scalar value is a registry entry and a kernel specialisation.
"""
import numbers
from typing import Dict, List, Optional, Tuple

import torch
import triton

from kernels import _runtime
from kernels._validate import check_same
from kernels.attention.kernels import MASK_BLOCK, _block_mask_cells
from triton.runtime.interpreter import InterpretedFunction

JIT_TYPES = (triton.runtime.JITFunction, InterpretedFunction)
"""What @triton.jit makes, compiled or interpreted (kernels/_runtime.py chooses)."""

CELL = MASK_BLOCK.value
"""Cell size of a block mask, in queries and keys."""
CHUNK = 32
"""Query rows per mod evaluation in the summary kernel (a CHUNK x CELL tile at a time)."""

_REGISTRY: List[Tuple] = []
"""Key -> (functions, extra layout): a tensor slot is None, a scalar slot holds its value."""
_KEYS: Dict[Tuple, int] = {}


def _register(entry: Tuple) -> int:
    if entry not in _KEYS:
        _KEYS[entry] = len(_REGISTRY)
        _REGISTRY.append(entry)
    return _KEYS[entry]


def _check_jit(name: str, fn, n_args: int, n_extra: int) -> None:
    """TypeError naming ``name`` unless ``fn`` is a @triton.jit function of ``n_args`` + ``n_extra`` parameters."""
    if not isinstance(fn, JIT_TYPES):
        raise TypeError(f"{name} must be a @triton.jit function, got {fn!r}")
    params = list(fn.arg_names)
    if len(params) != n_args + n_extra:
        raise TypeError(f"{name}: {fn.__name__}{tuple(params)} must take {n_args} index/score arguments and the "
                        f"{n_extra} extra argument(s) given, {n_args + n_extra} in all")


def _layout(name: str, extra) -> Tuple:
    """The registry layout of ``extra``: None for a tensor slot, the value of an int/float scalar."""
    layout = []
    for i, value in enumerate(extra):
        if isinstance(value, torch.Tensor):
            layout.append(None)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            layout.append(int(value) if isinstance(value, numbers.Integral) else float(value))
        else:
            raise TypeError(f"{name}: extra argument {i} must be a tensor or an int/float scalar, got {value!r}")
    return tuple(layout)


class MaskMod:
    """A mask mod with its extra arguments: ``MaskMod(fn, *extra)``, ``fn(b, h, q_idx, kv_idx, *extra)`` a
    ``@triton.jit`` function returning a bool tile (True = the query sees the key)."""

    def __init__(self, fn, *extra):
        _check_jit("mask_mod", fn, 4, len(extra))
        self.fn = fn
        self.tensors = [t for t in extra if isinstance(t, torch.Tensor)]
        self.key = _register(("mask", fn, _layout("mask_mod", extra)))


class ScoreMod:
    """A score mod, its derivative and their extra arguments: ``ScoreMod(fn, grad_fn, *extra)``; both
    ``@triton.jit`` functions of ``(score, b, h, q_idx, kv_idx, *extra)`` returning fp32 tiles, ``grad_fn`` the
    elementwise d fn / d score."""

    def __init__(self, fn, grad_fn, *extra):
        _check_jit("score_mod", fn, 5, len(extra))
        _check_jit("score_mod's grad_fn", grad_fn, 5, len(extra))
        self.fn, self.grad_fn = fn, grad_fn
        self.tensors = [t for t in extra if isinstance(t, torch.Tensor)]
        self.key = _register(("score", fn, grad_fn, _layout("score_mod", extra)))


def kernel_extra(key: int, tensors: Optional[List[torch.Tensor]]) -> tuple:
    """The kernels' extra-argument tuple of registry entry ``key``: its scalars with ``tensors`` in the slots."""
    supplied = iter(tensors or ())
    return tuple(next(supplied) if value is None else value for value in _REGISTRY[key][-1])


def functions(key: int) -> tuple:
    """The @triton.jit functions of registry entry ``key``: (mask_mod,) or (score_mod, grad_fn)."""
    return _REGISTRY[key][1:-1]


def as_mask_mod(mask_mod) -> MaskMod:
    """``mask_mod`` as a :class:`MaskMod` (a bare @triton.jit function takes no extra arguments)."""
    return mask_mod if isinstance(mask_mod, MaskMod) else MaskMod(mask_mod)


def check_extra_devices(name: str, mod, device: torch.device) -> None:
    """ValueError naming ``name`` unless ``mod``'s extra tensors are on ``device``."""
    for t in mod.tensors:
        if t.device != device:
            raise ValueError(f"{name}: extra tensors must be on the inputs' device {device}, got one on {t.device}")


class BlockMask:
    """A mask mod and its per-cell summary for attention of shape (B, H, Nq, Nk) (B or H None: the same mask for
    every batch row / head, the mod evaluated at b = 0 / h = 0), from :func:`create_block_mask`.

    ``summary``: int32 (B or 1, H or 1, QC * KC + 2 * QC + 2 * KC), QC = cdiv(Nq, 128), KC = cdiv(Nk, 128): the
    cell states (QC, KC) row-major (0 empty, 1 partial, 2 full), then per query cell the [first, last + 1) of its
    non-empty key cells (the forward and dQ loops), then per key cell that of its non-empty query cells (dK/dV)."""

    def __init__(self, mask_mod: MaskMod, shape: Tuple, device: torch.device, summary: torch.Tensor):
        self.mask_mod, self.shape, self.device, self.summary = mask_mod, shape, device, summary

    def states(self) -> torch.Tensor:
        """The (B or 1, H or 1, QC, KC) cell states."""
        n_q, n_k = self.shape[2:]
        qc, kc = triton.cdiv(n_q, CELL), triton.cdiv(n_k, CELL)
        return self.summary[..., :qc * kc].unflatten(-1, (qc, kc))

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """ValueError naming ``mask_mod`` unless this mask was built for q (B, H, Nq, D), k (B, Hkv, Nk, D)."""
        batch, heads, n_q = q.shape[:3]
        b, h, m, n = self.shape
        if b not in (None, batch) or h not in (None, heads) or (m, n) != (n_q, k.shape[2]):
            raise ValueError(f"mask_mod: the block mask was built for (B, H, Nq, Nk) = {self.shape}, the inputs are "
                             f"{(batch, heads, n_q, k.shape[2])}")
        if self.device != q.device:
            raise ValueError(f"mask_mod: the block mask was built on {self.device}, the inputs are on {q.device}")

    def expanded(self, batch: int, heads: int) -> torch.Tensor:
        """The summary as (batch, heads, L), broadcast dims with stride 0 (as the kernels read it)."""
        return self.summary.expand(batch, heads, -1)


def _first_last(nonempty: torch.Tensor) -> torch.Tensor:
    """[first, last + 1) of the True entries along the last dim, int32 (..., 2); [0, 0) for none."""
    n = nonempty.shape[-1]
    idx = torch.arange(n, device=nonempty.device, dtype=torch.int32)
    last = torch.where(nonempty, idx + 1, 0).amax(-1) if n else nonempty.new_zeros(nonempty.shape[:-1], dtype=torch.int32)
    first = torch.where(nonempty, idx, n).amin(-1) if n else last
    return torch.stack([torch.minimum(first, last), last], -1).to(torch.int32)


def create_block_mask(mask_mod, B: Optional[int], H: Optional[int], Nq: int, Nk: int, device=None) -> BlockMask:
    """The :class:`BlockMask` of ``mask_mod`` (a :class:`MaskMod` or a bare @triton.jit mask mod) for attention of
    shape (B, H, Nq, Nk); B/H None broadcast. One Triton launch evaluates the mod over every cell; the rest is a
    few tensor ops on ``device`` (default: the extra tensors' device, else cpu), with no host sync."""
    mod = as_mask_mod(mask_mod)
    for name, size in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)):
        optional = name in ("B", "H") and size is None
        if not optional and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0):
            raise ValueError(f"create_block_mask: {name} must be a non-negative int{' or None' if name in 'BH' else ''},"
                             f" got {size!r}")
    device = torch.device(device if device is not None else (mod.tensors[0].device if mod.tensors else "cpu"))
    check_extra_devices("mask_mod", mod, device)
    batch, heads = B or 1, H or 1
    n_q_cells, n_k_cells = triton.cdiv(Nq, CELL), triton.cdiv(Nk, CELL)
    states = torch.zeros((batch, heads, n_q_cells, n_k_cells), dtype=torch.int32, device=device)
    if states.numel():
        with _runtime.launch_device(states):
            _block_mask_cells[(n_q_cells * batch * heads,)](states, kernel_extra(mod.key, mod.tensors), heads, Nq, Nk,
                                                           MASK_MOD=mod.fn, CHUNK=CHUNK)
    nonempty = states > 0
    summary = torch.cat([states.flatten(2), _first_last(nonempty).flatten(2),
                         _first_last(nonempty.transpose(2, 3)).flatten(2)], 2).contiguous()
    return BlockMask(mod, (B, H, int(Nq), int(Nk)), device, summary)
