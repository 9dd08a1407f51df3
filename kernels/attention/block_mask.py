"""User-defined masks and scores for :func:`kernels.attention`, in the spirit of PyTorch's FlexAttention.

A *mask mod* is a ``@triton.jit`` function ``mask_mod(b, h, q_idx, kv_idx, *extra) -> bool or int tile`` (nonzero =
visible, in the block mask and in the kernels alike; floats are a TypeError naming the mod) and a *score mod* one
``score_mod(score, b, h, q_idx, kv_idx, *extra) -> float score tile`` with its elementwise derivative
``grad(score, b, h, q_idx, kv_idx, *extra) = d score_mod / d score`` for the backward. The kernels evaluate them on
tiles: ``b``, ``h`` (batch, query head) are scalars, ``q_idx``/``kv_idx`` broadcastable index tensors of absolute
positions (a (BLOCK_M, 1) column and a (1, BLOCK_N) row, transposed in the dK/dV kernel: mods must be
elementwise), clamped into [0, Nq) x [0, Nk) so they may index per-position tensors without masks; ``score`` is
the fp32 scaled score ``scale * q . k`` (the score mod runs before softcap and ALiBi). ``extra`` are the tensors
and int/float scalars given to :class:`MaskMod`/:class:`ScoreMod`; gradients w.r.t. extra tensors are not
computed (a score mod's extra tensor that requires grad is a ValueError while grad mode is on). Their
``index_dims={"param": dims}`` declares what indexes each dim of an extra tensor (``"b"``, ``"h"``, ``"q_idx"``,
``"kv_idx"``, a tuple of them, or None), so that every call checks the tensor is long enough (ValueError naming it)
before the kernels could read past its end: the shipped mods (mods.py) all declare theirs. A Python ``if``,
``and``, ``or`` or ``not`` on a tile in a mod's body is a TypeError (Triton's interpreter takes any tile as True).

:func:`create_block_mask` summarises a mask mod per MASK_BLOCK x MASK_BLOCK cell (128 x 128; every kernel tile
lies in one cell) as empty, partial or full with one Triton launch. The attention kernels skip empty cells (K/V
never loaded), run full cells without evaluating the mod, and evaluate it only in partial cells; the summary is
computed once and reused by the backward and by every call given the same :class:`BlockMask`.

Through ``torch.compile``: custom ops cannot take Python callables, so a mod travels through the op as an int key
into :data:`_REGISTRY` (its functions and scalars: equal mods share a key, so a per-step ``document_mask(ids)``
neither grows the registry nor recompiles) plus its extra tensors as a ``Tensor[]``. Values that change from call
to call belong in tensors: each distinct scalar value is a registry entry and a kernel specialisation.
"""
import ast
import functools
import inspect
import numbers
import textwrap
from typing import Dict, List, Optional, Tuple

import torch
import triton

from kernels import _runtime
from kernels._runtime import cdiv
from kernels._validate import check_size, refuse_dtensor
from kernels.attention.kernels import MASK_BLOCK, _block_mask_cells
from triton.errors import TritonError
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


# Run, not traced, under torch.compile (a graph break): the graph's launches look the key up, and dynamo would
# replay a traced append to the registry only after the graph ran
@torch.compiler.disable
def _register(entry: Tuple) -> int:
    # scalars compared by type and exact value: 4 == 4.0 and 0.0 == -0.0 in Python, but not in the kernel
    lookup = (*entry[:-1], tuple(v if v is None or type(v) is int else v.hex() for v in entry[-1]))
    if lookup not in _KEYS:
        _KEYS[lookup] = len(_REGISTRY)
        _REGISTRY.append(entry)
    return _KEYS[lookup]


def _check_jit(name: str, fn, n_args: int, n_extra: int) -> None:
    """TypeError naming ``name`` unless ``fn`` is a @triton.jit function of ``n_args`` + ``n_extra`` parameters
    that applies no Python truth test to a tile (:func:`_truth_test_of_a_tile`)."""
    if not isinstance(fn, JIT_TYPES):
        hint = " (Python mods, as torch's FlexAttention takes, cannot run in the kernels)" if callable(fn) else ""
        raise TypeError(f"{name} must be a @triton.jit function{hint}, got {fn!r}")
    params = list(fn.arg_names)
    if len(params) != n_args + n_extra:
        raise TypeError(f"{name}: {fn.__name__}{tuple(params)} must take {n_args} index/score arguments and the "
                        f"{n_extra} extra argument(s) given, {n_args + n_extra} in all")
    test = _truth_test_of_a_tile(fn, (2, 3) if n_args == 4 else (0, 3, 4))
    if test is not None:
        raise TypeError(f"{name} {fn.__name__}: `{test}` is a Python if/and/or/not on a tile, which Triton's "
                        f"interpreter takes as True whatever its values (silently wrong on CPU) and a GPU "
                        f"build refuses for `if`: use &, |, ~ and tl.where, which act elementwise")


@torch.compiler.disable  # source reading, not traceable (a mod built under torch.compile is a graph break anyway)
@functools.lru_cache(maxsize=None)
def _truth_test_of_a_tile(fn, tile_args: Tuple[int, ...]) -> Optional[str]:
    """The source of the first ``if``/``while`` test, conditional expression, ``and``/``or`` or ``not`` in ``fn``'s
    body that reads a tile: a parameter at ``tile_args`` (q_idx, kv_idx, score) or a name assigned from one.
    None if there is none, or no function source to read. A check of the mod's own body, not of the helpers it
    calls."""
    try:
        source = textwrap.dedent(inspect.getsource(fn.fn))
        func = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(func, ast.FunctionDef):  # triton.jit(lambda ...): getsource gives the line around it
        return None
    params = [arg.arg for arg in func.args.args]
    tiles = {params[i] for i in tile_args if i < len(params)}

    def reads_a_tile(node) -> bool:
        return any(isinstance(n, ast.Name) and n.id in tiles for n in ast.walk(node))

    grew = True
    while grew:  # names assigned from tiles are tiles, in any statement order (loops)
        grew = False
        for node in ast.walk(func):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None \
                    and reads_a_tile(node.value):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name) and n.id not in tiles:
                            tiles.add(n.id)
                            grew = True
    for node in ast.walk(func):
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            test = node.test
        elif isinstance(node, ast.BoolOp) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            test = node
        else:
            continue
        if reads_a_tile(test):
            return ast.get_source_segment(source, test)
    return None


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


INDICES = {"b": "B", "h": "H", "q_idx": "Nq", "kv_idx": "Nk"}
"""The indices a mod may index an extra tensor by, with the size of the call each ranges over."""


def _normalised_dims(where: str, tensor: torch.Tensor, dims) -> Tuple[Tuple[str, ...], ...]:
    """``dims`` (one entry per dim of ``tensor``: None, an index name or a tuple of them) as tuples of names."""
    if not isinstance(dims, (tuple, list)) or len(dims) != tensor.dim():
        raise ValueError(f"{where}: index_dims must give one entry per dim of its shape {tuple(tensor.shape)}, "
                         f"got {dims!r}")
    entries = tuple(() if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
                    for entry in dims)
    for names in entries:
        if not all(isinstance(name, str) and name in INDICES for name in names):
            raise ValueError(f"{where}: index_dims entries must be None, or names (or tuples of names) among "
                             f"{tuple(INDICES)}, got {dims!r}")
    return entries


class _Mod:
    """What :class:`MaskMod` and :class:`ScoreMod` share: the extra tensors, what indexes them, and the checks
    of both against a call.

    ``index_dims`` maps the name of an extra tensor parameter of ``fn`` to what indexes each of the tensor's dims:
    None (nothing the call's sizes bound), ``"b"``, ``"h"``, ``"q_idx"``, ``"kv_idx"`` or a tuple of them (e.g.
    ``("b", ("q_idx", "kv_idx"))`` for a (B, N) tensor read at both positions). Calls then check each such dim is
    at least the size its index ranges over (B, H, Nq, Nk) before any launch, so a short tensor is a ValueError,
    not a read past its end; and B=None / H=None block masks can check the mod's cells at b = 1 / h = 1."""

    def __init__(self, kind: str, fn, n_args: int, extra: tuple, index_dims: Optional[Dict[str, tuple]]):
        self.kind, self.fn = kind, fn
        self.tensors = [t for t in extra if isinstance(t, torch.Tensor)]
        params = dict(zip(list(fn.arg_names)[n_args:], extra))
        self.tensor_names = [name for name, value in params.items() if isinstance(value, torch.Tensor)]
        for name, t in zip(self.tensor_names, self.tensors):  # the @triton.jit function reads its own memory
            refuse_dtensor(f"{kind} {fn.__name__}'s {name}", t)
        if index_dims is not None and not isinstance(index_dims, dict):
            raise TypeError(f"{kind} {fn.__name__}: index_dims must be a dict {{extra tensor parameter: dims}} or "
                            f"None, got {index_dims!r}")
        self.indexed = []  # (parameter name, tensor, per-dim tuples of index names) of those index_dims names
        for name, dims in (index_dims or {}).items():
            if not isinstance(params.get(name), torch.Tensor):
                raise ValueError(f"{kind} {fn.__name__}: index_dims names {name!r}, not one of its extra tensor "
                                 f"parameters {[p for p, value in params.items() if isinstance(value, torch.Tensor)]}")
            where = f"{kind} {fn.__name__}'s {name}"
            self.indexed.append((name, params[name], _normalised_dims(where, params[name], dims)))

    def check_call(self, device: torch.device, sizes: Dict[str, int]) -> None:
        """ValueError naming the mod unless its extra tensors are on ``device`` and every indexed dim is at least
        the ``sizes`` ({"b": B, "h": H, "q_idx": Nq, "kv_idx": Nk}) its index ranges over."""
        for t in self.tensors:
            if t.device != device:
                raise ValueError(f"{self.kind}: extra tensors must be on the inputs' device {device}, got one on "
                                 f"{t.device}")
        for name, tensor, dims in self.indexed:
            for axis, index in ((axis, index) for axis, names in enumerate(dims) for index in names):
                if tensor.shape[axis] < sizes[index]:
                    raise ValueError(f"{self.kind} {self.fn.__name__}: {name} has shape {tuple(tensor.shape)}, but "
                                     f"its dim {axis} is indexed by {index} and needs length >= "
                                     f"{INDICES[index]} = {sizes[index]}")

    def can_read_at_one(self, index: str) -> bool:
        """Whether evaluating the mod at ``index`` (b or h) = 1 reads inside its extra tensors: every extra tensor
        declares its index dims and those indexed by ``index`` have length >= 2."""
        declared = {id(tensor) for _, tensor, _ in self.indexed}
        return (all(id(t) in declared for t in self.tensors)
                and all(tensor.shape[axis] >= 2 for _, tensor, dims in self.indexed
                        for axis, names in enumerate(dims) if index in names))


class MaskMod(_Mod):
    """A mask mod with its extra arguments: ``MaskMod(fn, *extra, index_dims=None)``, ``fn(b, h, q_idx, kv_idx,
    *extra)`` a ``@triton.jit`` function returning a bool or int tile (nonzero = the query sees the key; a float
    result is a TypeError); ``index_dims`` as :class:`_Mod` says."""

    def __init__(self, fn, *extra, index_dims: Optional[Dict[str, tuple]] = None):
        _check_jit("mask_mod", fn, 4, len(extra))
        super().__init__("mask_mod", fn, 4, extra, index_dims)
        self.key = _register(("mask", fn, _layout("mask_mod", extra)))


class ScoreMod(_Mod):
    """A score mod, its derivative and their extra arguments: ``ScoreMod(fn, grad_fn, *extra, index_dims=None)``;
    both ``@triton.jit`` functions of ``(score, b, h, q_idx, kv_idx, *extra)`` returning floating-point tiles
    (computed on in fp32; a tile broadcastable to the score's, such as a per-row value, is broadcast),
    ``grad_fn`` the elementwise d fn / d score; ``index_dims`` (names of ``fn``'s parameters) as :class:`_Mod`
    says."""

    def __init__(self, fn, grad_fn, *extra, index_dims: Optional[Dict[str, tuple]] = None):
        _check_jit("score_mod", fn, 5, len(extra))
        _check_jit("score_mod's grad_fn", grad_fn, 5, len(extra))
        super().__init__("score_mod", fn, 5, extra, index_dims)
        self.grad_fn = grad_fn
        self.key = _register(("score", fn, grad_fn, _layout("score_mod", extra)))

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """ValueError naming score_mod unless its extra tensors suit q (B, H, Nq, D), k (B, Hkv, Nk, D) and, with
        grad mode on, none requires grad: their gradients are not computed (FlexAttention's are), so a learned
        bias read by the mod would silently get none."""
        self.check_call(q.device, _call_sizes(q, k))
        if torch.is_grad_enabled():
            for name, t in zip(self.tensor_names, self.tensors):
                if t.requires_grad:
                    raise ValueError(f"score_mod {self.fn.__name__}: its extra tensor {name} requires grad, but "
                                     f"gradients with respect to a mod's extra tensors are not computed (a bias to "
                                     f"learn needs another attention, e.g. torch's flex_attention); pass "
                                     f"{name}.detach() to use it as a constant")


def _call_sizes(q: torch.Tensor, k: torch.Tensor) -> Dict[str, int]:
    """The ranges of a mod's indices in attention of q (B, H, Nq, D), k (B, Hkv, Nk, D)."""
    return dict(zip(INDICES, (*q.shape[:3], k.shape[2])))


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


class BlockMask:
    """A mask mod and its per-cell summary for attention of shape (B, H, Nq, Nk), from :func:`create_block_mask`.

    B or H None: one summary for every batch row / head, that of b = 0 / h = 0 (the mod itself still sees the
    real b and h in partial cells), so the mod's cells must not depend on b / h. create_block_mask checks that
    at b = 1 / h = 1 where it can read there (see :func:`create_block_mask`); other batch rows and heads are the
    caller's promise.

    ``summary``: int32 (B or 1, H or 1, QC * KC + 2 * QC + 2 * KC), QC = cdiv(Nq, 128), KC = cdiv(Nk, 128): the
    cell states (QC, KC) row-major (0 empty, 1 partial, 2 full), then per query cell the [first, last + 1) of its
    non-empty key cells (the forward and dQ loops), then per key cell that of its non-empty query cells (dK/dV)."""

    def __init__(self, mask_mod: MaskMod, shape: Tuple, device: torch.device, summary: torch.Tensor):
        self.mask_mod, self.shape, self.device, self.summary = mask_mod, shape, device, summary

    def states(self) -> torch.Tensor:
        """The (B or 1, H or 1, QC, KC) cell states."""
        n_q, n_k = self.shape[2:]
        qc, kc = cdiv(n_q, CELL), cdiv(n_k, CELL)
        return self.summary[..., :qc * kc].unflatten(-1, (qc, kc))

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """ValueError naming ``mask_mod`` unless this mask was built for q (B, H, Nq, D), k (B, Hkv, Nk, D) on their
        device and its mod's extra tensors are long enough for them."""
        batch, heads, n_q = q.shape[:3]
        b, h, m, n = self.shape
        if b not in (None, batch) or h not in (None, heads) or (m, n) != (n_q, k.shape[2]):
            raise ValueError(f"mask_mod: the block mask was built for (B, H, Nq, Nk) = {self.shape}, the inputs are "
                             f"{(batch, heads, n_q, k.shape[2])}")
        if self.device != q.device:
            raise ValueError(f"mask_mod: the block mask was built on {self.device}, the inputs are on {q.device}")
        self.mask_mod.check_call(q.device, _call_sizes(q, k))

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


def _check_sizes(B, H, Nq, Nk) -> None:
    """TypeError naming the size unless B, H are ints or None and Nq, Nk ints; ValueError for a negative one."""
    for name, size in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)):
        check_size("create_block_mask", name, size, optional=name in ("B", "H"))


def _kernel_device(device, mod: MaskMod) -> torch.device:
    """``device`` (default: the mod's extra tensors' device, else the kernels') as :func:`_runtime.kernel_device`."""
    return _runtime.kernel_device(mod.tensors[0].device if device is None and mod.tensors else device,
                                  "create_block_mask")


def causes(error: BaseException):
    """``error`` and the errors it was raised from (a compile error in a nested @triton.jit call is wrapped at
    each call site, the message only in the innermost)."""
    while error is not None:
        yield error
        error = error.__cause__


_MASK_DTYPE = "mask_mod must return a bool or int tile"
_SCORE_DTYPE = "score_mod and its grad_fn must return a floating-point tile"
"""The build-time checks of a mod's result (``tl.static_assert`` in kernels.py), found in a Triton error."""


def result_kind_error(error: TritonError, mask_fn=None, score_fn=None) -> Optional[TypeError]:
    """The TypeError naming the mask mod ``mask_fn`` or score mod ``score_fn`` whose result the kernels' build-time
    check refused in ``error`` (floats from a mask mod, anything but floats from a score mod or its grad_fn), or
    None if the error is another one."""
    messages = [str(e) for e in causes(error)]
    if mask_fn is not None and any(_MASK_DTYPE in m for m in messages):
        return TypeError(f"mask_mod {mask_fn.__name__} must return a bool or int tile (nonzero = the query sees the "
                         f"key), not floats")
    if score_fn is not None and any(_SCORE_DTYPE in m for m in messages):
        return TypeError(f"score_mod {score_fn.__name__} (or its grad_fn) must return a floating-point tile: the "
                         f"modified score (grad_fn: its derivative in the score)")
    return None


def unevaluable(what: str, error: TritonError) -> TypeError:
    """The TypeError for a mod (``what``: "mask_mod NAME", ...) the kernels could not compile or run, with Triton's
    innermost reason."""
    reason = str(list(causes(error))[-1]).strip() or type(error).__name__
    return TypeError(f"{what} cannot be evaluated on tiles as the kernels evaluate it (q_idx a column and kv_idx a "
                     f"row, and transposed): a mod is @triton.jit code, tl.* operations elementwise on the tiles (no "
                     f"torch or Python function of a tile), returning a tile that broadcasts to the scores'; Triton: "
                     f"{reason}")


def _cell_states(mod: MaskMod, batch: int, heads: int, Nq: int, Nk: int, device: torch.device) -> torch.Tensor:
    """The (batch, heads, QC, KC) int32 cell states of ``mod`` (one launch, the custom op's while torch.compile
    traces: dynamo cannot trace a launch); TypeError naming the mod if it returns neither bools nor ints."""
    if torch.compiler.is_compiling():
        return _cell_states_op(list(mod.tensors), mod.key, batch, heads, Nq, Nk, device)
    return _launch_cells(list(mod.tensors), mod.key, batch, heads, Nq, Nk, device)


def _launch_cells(tensors: List[torch.Tensor], key: int, batch: int, heads: int, Nq: int, Nk: int,
                  device: torch.device) -> torch.Tensor:
    """:func:`_cell_states` of the mask mod of registry entry ``key`` with its extra ``tensors``."""
    states = torch.zeros((batch, heads, cdiv(Nq, CELL), cdiv(Nk, CELL)), dtype=torch.int32, device=device)
    if states.numel():
        fn, = functions(key)
        try:
            with _runtime.launch_device(states):
                _block_mask_cells[(states.shape[2] * batch * heads,)](
                    states, kernel_extra(key, tensors), heads, Nq, Nk, MASK_MOD=fn, CHUNK=CHUNK)
        except TritonError as error:  # the result's dtype (_mask_mod_shows), or a mod the kernels cannot build
            raise result_kind_error(error, mask_fn=fn) or unevaluable(f"mask_mod {fn.__name__}", error) from error
    return states


_cell_states_op = torch.library.custom_op("kernels::block_mask_cells", _launch_cells, mutates_args=())


@_cell_states_op.register_fake
def _(tensors, key, batch, heads, Nq, Nk, device):
    return torch.empty((batch, heads, cdiv(Nq, CELL), cdiv(Nk, CELL)), dtype=torch.int32, device=device)


def _one_for_all(states: torch.Tensor, dim: int, probed: bool, mod: MaskMod, size: str) -> torch.Tensor:
    """``states`` at index 0 of ``dim``; if index 1 was ``probed`` too, ValueError unless it is the same (while
    torch.compile traces, a device assert with that message)."""
    if probed:
        index = "b" if size == "B" else "h"
        message = (f"create_block_mask: {size}=None means one mask for every {index}, but mask_mod "
                   f"{mod.fn.__name__}'s cells differ between {index} = 0 and {index} = 1; pass {size}")
        if torch.compiler.is_compiling():  # dynamo cannot read a value: a device assert (torch._assert_async)
            torch._assert_async((states.select(dim, 0) == states.select(dim, 1)).all(), message)
        elif not torch.equal(states.select(dim, 0), states.select(dim, 1)):  # one host sync, at creation only
            raise ValueError(message)
        states = states.narrow(dim, 0, 1)
    return states


def create_block_mask(mask_mod, B: Optional[int], H: Optional[int], Nq: int, Nk: int, device=None) -> BlockMask:
    """The :class:`BlockMask` of ``mask_mod`` (a :class:`MaskMod` or a bare @triton.jit mask mod) for attention of
    shape (B, H, Nq, Nk); B/H None broadcast. One Triton launch evaluates the mod over every cell; the rest is a
    few tensor ops on ``device`` (default: the extra tensors' device, else where the kernels run), with no host
    sync when B and H are given.

    B=None (H=None) also evaluates the cells at b = 1 (h = 1) in the same launch and raises ValueError if they
    differ from b = 0's (one host sync; while torch.compile traces, a device assert) - where the mod can be read
    there: it has no extra tensors, or all of them declare ``index_dims`` and those indexed by b (h) have length
    >= 2. A mod whose cells first differ at a later b (h), or with undeclared extra tensors, is not checked: give
    B (H) for a mod that depends on it."""
    mod = as_mask_mod(mask_mod)
    _check_sizes(B, H, Nq, Nk)
    device = _kernel_device(device, mod)
    batch, heads = 1 if B is None else B, 1 if H is None else H
    mod.check_call(device, dict(b=batch, h=heads, q_idx=Nq, kv_idx=Nk))
    probe_b, probe_h = B is None and mod.can_read_at_one("b"), H is None and mod.can_read_at_one("h")
    states = _cell_states(mod, batch + probe_b, heads + probe_h, Nq, Nk, device)
    states = _one_for_all(_one_for_all(states, 0, probe_b, mod, "B"), 1, probe_h, mod, "H")
    nonempty = states > 0
    summary = torch.cat([states.flatten(2), _first_last(nonempty).flatten(2),
                         _first_last(nonempty.transpose(2, 3)).flatten(2)], 2).contiguous()
    return BlockMask(mod, (B, H, int(Nq), int(Nk)), device, summary)
