"""Attention's argument checks, shared by every attention path (dense, varlen, decoding, the SDPA shim, ring
attention, flash-attn's functions): each raises TypeError/ValueError naming the argument before anything launches,
and reads no tensor value on the host. A DTensor is refused by name (:func:`check_tensor`): the kernels read one
tensor's memory.

Index tensors' values (varlen's offsets, decoding's lengths, rows and pages) are checked on the device by one small
Triton program per call that reads them once and stores an int32 verdict (:func:`new_verdict`), then
:func:`enforce` raises from it: one launch and one device assert per call on a GPU, however many rules.
"""
import math
import numbers
import threading
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from kernels import _runtime, _validate
from kernels._validate import DTENSOR_TYPES, FLOAT_DTYPES, assert_on_device, check_same
from kernels.attention import block_mask as mods, configs
from kernels.attention.kernels import _mask_mod_shows, _score_mod_result
from triton.errors import TritonError


_TENSOR, _STRIDED = torch.Tensor, torch.strided


def refuse_dtensor(name: str, t) -> None:
    """TypeError naming ``name`` for a DTensor (``_validate.refuse_dtensor``), saying what an attention path
    takes instead."""
    if isinstance(t, DTENSOR_TYPES):
        _validate.refuse_dtensor(name, t, f"{name}.to_local() (this rank's shard: its heads or batch rows) or "
                                          f"{name}.full_tensor() (the whole tensor); for a sequence sharded across "
                                          "ranks, kernels.distributed.ring_attention of the local shards")


def check_tensor(name: str, t, **kwargs) -> None:
    """``kernels._validate.check_tensor`` (TypeError/ValueError naming ``name`` unless ``t`` is a dense tensor of
    ``dtypes`` and the rank asked), and TypeError for a DTensor (:func:`refuse_dtensor`): every attention path's
    full check of a tensor argument."""
    refuse_dtensor(name, t)
    _validate.check_tensor(name, t, **kwargs)


def _taken_subclass(t) -> bool:
    """Whether ``t``, not a plain torch.Tensor, is a tensor subclass the fast checks pass (a Parameter,
    torch.compile's fake and functional tensors): any but a DTensor, which the full checks refuse."""
    return isinstance(t, _TENSOR) and not isinstance(t, DTENSOR_TYPES)


ATTENTION_DTYPES = (*FLOAT_DTYPES, torch.float64)
"""The dtypes :func:`kernels.attention` takes: the kernels' own, and float64, which runs ``kernels.reference``'s
torch ops (as softmax and the norms run torch's ops for it); every other attention path takes FLOAT_DTYPES."""


def plain_qkv_shapes(q, k, v, dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
                     ) -> Optional[Tuple[torch.Size, torch.Size, torch.Size]]:
    """(q's, k's, v's shapes) where q, k, v are dense 4-D tensors of one dtype of ``dtypes`` on one device (the
    common case: each attribute read once, without building the checks' arguments); None where any is not (the
    checks then name what is wrong)."""
    if not ((type(q) is _TENSOR or _taken_subclass(q)) and (type(k) is _TENSOR or _taken_subclass(k))
            and (type(v) is _TENSOR or _taken_subclass(v))
            and q.layout is _STRIDED and k.layout is _STRIDED and v.layout is _STRIDED  # is_dense, inline
            and not (q.is_nested or k.is_nested or v.is_nested)):
        return None
    dtype, shapes = q.dtype, (q.shape, k.shape, v.shape)
    if (len(shapes[0]) == len(shapes[1]) == len(shapes[2]) == 4 and dtype in dtypes and k.dtype is dtype
            and v.dtype is dtype and q.device == k.device == v.device):
        return shapes
    return None


HEADS_FIRST_LAYOUTS = ("(B, H, Nq, D)", "(B, Hkv, Nk, D)")
"""The layouts :func:`check_qkv`'s messages name by default: q's, and k's and v's."""


def check_qkv(q, k, v, shown: Optional[Tuple] = None, names: Tuple[str, str, str] = ("q", "k", "v"),
              dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES) -> Tuple[torch.Size, torch.Size]:
    """Raise TypeError/ValueError naming the argument unless q, k, v are valid attention inputs; return q's and k's
    shapes (read here once: each read of ``.shape`` builds a Size). ``shown``: for a caller that passes (B, H, N, D)
    views of its own tensors, (q's, k's, v's shapes, q's layout, k's and v's layout) that the messages show
    instead of the views' (default: the views and :data:`HEADS_FIRST_LAYOUTS`). ``names``: the arguments the
    messages name for q, k, v (a caller that passes views of one packed tensor names it for each it stacks).
    ``dtypes``: those the caller takes (:data:`ATTENTION_DTYPES` for :func:`kernels.attention`)."""
    shapes = plain_qkv_shapes(q, k, v, dtypes)
    if shapes is None:
        named = dict(zip(names, (q, k, v)))  # a name given twice is one packed tensor: checked once
        for name, t in named.items():
            check_tensor(name, t, ndim=4, dtypes=dtypes)
        check_same("dtype", **named)
        check_same("device", **named)
        shapes = q.shape, k.shape, v.shape
    q_shape, k_shape, v_shape = shapes
    batch, heads, _, d = q_shape
    if k_shape != v_shape:
        _, k_shown, v_shown, _, kv_layout = _displayed(q_shape, k_shape, v.shape, shown)
        raise ValueError(f"{names[1]} and {names[2]} must have the same shape {kv_layout}, got {k_shown} and "
                         f"{v_shown}")
    if k_shape[0] != batch:
        q_name, k_name, kv_name = _message_names(names)
        _, k_shown, _, q_layout, _ = _displayed(q_shape, k_shape, v.shape, shown)
        raise ValueError(f"{kv_name} must have batch size {batch} like {q_name} {q_layout}, got {k_name} of shape "
                         f"{k_shown}")
    if k_shape[3] != d:
        q_name, k_name, kv_name = _message_names(names)
        _, k_shown, _, q_layout, _ = _displayed(q_shape, k_shape, v.shape, shown)
        raise ValueError(f"{kv_name} must have head dim {d} like {q_name} {q_layout}, got {k_name} of shape "
                         f"{k_shown}")
    if not 1 <= d <= configs.MAX_HEAD_DIM:
        q_name = names[0]
        q_shown = _displayed(q_shape, k_shape, v.shape, shown)[0]
        raise ValueError(f"{q_name}: head dim must be in 1..{configs.MAX_HEAD_DIM}, got {q_name} of shape {q_shown}")
    kv_heads = k_shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        q_name, k_name, kv_name = _message_names(names)
        k_shown = _displayed(q_shape, k_shape, v.shape, shown)[1]
        raise ValueError(f"{kv_name}: the number of kv heads must divide {q_name}'s {heads} heads and be at least 1, "
                         f"got {k_name} of shape {k_shown}")
    return q_shape, k_shape


def _message_names(names: Tuple[str, str, str]) -> Tuple[str, str, str]:
    """(q's name, k's name, k's and v's together: "k, v", or the one packed argument that holds both) for
    :func:`check_qkv`'s messages."""
    q_name, k_name, v_name = names
    return q_name, k_name, k_name if k_name == v_name else f"{k_name}, {v_name}"


def _displayed(q_shape, k_shape, v_shape, shown: Optional[Tuple]) -> Tuple:
    """(q's, k's, v's shapes as tuples, q's layout, k's and v's layout) for :func:`check_qkv`'s messages."""
    if shown is None:
        return (tuple(q_shape), tuple(k_shape), tuple(v_shape), *HEADS_FIRST_LAYOUTS)
    return (*(tuple(shape) for shape in shown[:3]), *shown[3:])


def check_scale(scale, d: int) -> float:
    """``scale`` as a float (1/sqrt(d) for None); TypeError unless it is a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    # a comparison, not math.isfinite: torch.compile traces it on a symbolic float (a scale that varies)
    if (type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real))
            or not -math.inf < scale < math.inf):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def key_bounds(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) int32 [first visible key, last visible key + 1) of a bool (B, Nk) mask, [0, 0) for an all-False row.

    Computed on the mask's device without a host sync (so it traces under ``torch.compile``); the kernels skip
    key blocks outside the range and read the mask itself inside it.
    """
    n_k = mask.shape[1]
    keys = torch.arange(n_k, device=mask.device, dtype=torch.int32)
    start = torch.where(mask, keys, n_k).amin(1, keepdim=True) if n_k else mask.new_zeros(mask.shape[0], 1).int()
    end = torch.where(mask, keys + 1, 0).amax(1, keepdim=True) if n_k else start
    return torch.cat([torch.minimum(start, end), end], 1).to(torch.int32).contiguous()


def check_padding_mask(mask, q, batch: int, n_k: int) -> None:
    """TypeError/ValueError naming key_padding_mask unless it is a bool (B, Nk) = (``batch``, ``n_k``) tensor on
    q's device."""
    if type(mask) is not torch.Tensor or mask.dtype is not torch.bool or mask.dim() != 2:  # else: passes
        check_tensor("key_padding_mask", mask, ndim=2, dtypes=(torch.bool,))
    if mask.shape != (batch, n_k):  # one Size read, compared by value
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(batch, n_k)}, got {tuple(mask.shape)}")
    if mask.device != q.device:  # the common case decided without building check_same's arguments
        check_same("device", q=q, key_padding_mask=mask)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; TypeError naming ``name`` unless a bool, numpy bool or int (0 false, else true: the
    functions have taken ints). ``bool()`` of anything would take the string "False" as true and None as false,
    and read a tensor's value on the host (an error for a tensor of several)."""
    if type(value) is bool:
        return value
    if not isinstance(value, (np.bool_, numbers.Integral)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_window(window_size) -> Tuple[int, int]:
    """``window_size`` as (left, right) ints; TypeError unless a pair of ints, ValueError for values below -1."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is type(window_size[1]) is int:
        left, right = window_size  # the common case (plain ints), decided without the numbers ABCs
        if left < -1 or right < -1:
            raise ValueError(f"window_size values must be >= -1 (-1 = unbounded), got {window_size}")
        return left, right
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(map(_validate.is_integer, window_size))):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size values must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def check_real(name: str, value, low: float, high: float = math.inf, high_open: bool = False,
               low_open: bool = False) -> float:
    """``value`` as a float; TypeError unless a real number, ValueError outside [low, high] (an end open where
    ``low_open`` / ``high_open`` says)."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                         f"got {value!r}")
    return float(value)


FP32_MAX = float(torch.finfo(torch.float32).max)
SOFTCAP_MAX = 2.0**127
"""The largest ``softcap`` (~1.7e38): the kernels take it in fp32 as softcap * log2(e), which is inf above
FP32_MAX / log2(e) ~ 2.36e38 (and every capped score NaN); a power of two, exact in fp32, with margin for that
product's rounding. A cap near it leaves every finite score as it is."""


def check_softcap(softcap) -> float:
    """``softcap`` as a float in [0, SOFTCAP_MAX] (0: none); TypeError/ValueError naming it otherwise."""
    return check_real("softcap", softcap, 0.0, SOFTCAP_MAX)


def check_attention_chunk(attention_chunk) -> int:
    """``attention_chunk`` as an int; TypeError unless an int, ValueError if negative (0: off)."""
    return _validate.check_int("attention_chunk", attention_chunk, 0, what="an int (0 = off)", bound=">= 0 (0 = off)")


def check_dropout(dropout_p) -> float:
    """``dropout_p`` as a float in [0, 1) (0: none); TypeError/ValueError naming it otherwise."""
    return check_real("dropout_p", dropout_p, 0.0, 1.0, high_open=True)


def check_alibi(alibi_slopes, q) -> None:
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    batch, heads = q.shape[:2]
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or (B, H) = {(batch, heads)}, "
                         f"got {tuple(alibi_slopes.shape)}")
    check_same("device", q=q, alibi_slopes=alibi_slopes)


def check_sinks(sinks, q) -> None:
    check_tensor("sinks", sinks, dtypes=ATTENTION_DTYPES)  # the kernels take them as float32
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must have shape (H,) = ({q.shape[1]},), got {tuple(sinks.shape)}")
    check_same("device", q=q, sinks=sinks)


def check_mods(mask_mod, score_mod, q, k) -> Optional[mods.BlockMask]:
    """The :class:`BlockMask` of ``mask_mod`` for q, k (built here from a mask mod), or None; TypeError/ValueError
    naming the argument for anything else, a mask built for other shapes or device, extra tensors elsewhere, or a
    mod the kernels cannot evaluate (:func:`probe_mod`)."""
    if score_mod is not None:
        if not isinstance(score_mod, mods.ScoreMod):
            raise TypeError(f"score_mod must be a kernels.ScoreMod(fn, grad_fn, *extra), got {score_mod!r}")
        score_mod.check(q, k)  # its extra tensors: device, and long enough for q, k
        if _unprobed(score_mod):
            probe_mod(score_mod, q, k)
    if mask_mod is None or isinstance(mask_mod, mods.BlockMask):
        block_mask = mask_mod
        if block_mask is not None and _unprobed(block_mask.mask_mod):
            block_mask.check(q, k)  # (again below) the probe reads its mod's tensors: long enough, on q's device
            probe_mod(block_mask.mask_mod, q, k)
    elif isinstance(mask_mod, (mods.MaskMod, *mods.JIT_TYPES)):
        mask_mod = mods.as_mask_mod(mask_mod)
        if _unprobed(mask_mod):  # before the block mask's launch, whose errors would not name the mod
            mask_mod.check_call(q.device, mods._call_sizes(q, k))
            probe_mod(mask_mod, q, k)
        # create_block_mask checks the mod's extra tensors are on q's device before its launch
        block_mask = mods.create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    else:
        # torch's BlockMask and Python mods hold Python code, which the kernels cannot run: say so, without a
        # BlockMask's many-line repr
        kind = type(mask_mod)
        raise TypeError(f"mask_mod must be a kernels.BlockMask, a kernels.MaskMod or a @triton.jit function (the "
                        f"kernels run Triton mods, not FlexAttention's Python ones: kernels.create_block_mask of a "
                        f"@triton.jit mask_mod), got a {kind.__module__}.{kind.__qualname__}")
    if block_mask is not None:
        block_mask.check(q, k)  # its device is q's, and its mod's tensors were checked against it when built
    return block_mask


PROBE_TILE = 16
"""Side of the tile :func:`probe_mod` evaluates a mod on (the smallest of the kernels' tiles)."""
_PROBED = set()
"""Registry keys (a mod's functions and scalars) of the mods :func:`probe_mod` passed in this process."""


def _unprobed(mod) -> bool:
    """Whether :func:`probe_mod` should evaluate ``mod``: not yet in this process, and not while torch.compile
    traces (which does not probe, and would otherwise guard on ``_PROBED``: a recompile once eager probed it)."""
    return not torch.compiler.is_compiling() and mod.key not in _PROBED


@triton.jit
def _probed_tile(q_idx, kv_idx, b, h, MASK_ARGS, SCORE_ARGS, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
                 SCORE_GRAD: tl.constexpr):
    """The sum of the given mods' results on one tile of indices, each through the kernels' own check of it."""
    score = (q_idx - kv_idx).to(tl.float32)  # a score tile of the orientation's shape
    total = score
    if MASK_MOD is not None:
        total += _mask_mod_shows(MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS), kv_idx).to(tl.float32)
    if SCORE_MOD is not None:
        total += _score_mod_result(SCORE_MOD(score, b, h, q_idx, kv_idx, *SCORE_ARGS), score)
        total += _score_mod_result(SCORE_GRAD(score, b, h, q_idx, kv_idx, *SCORE_ARGS), score)
    return tl.sum(tl.sum(total, 1), 0)


@triton.jit
def _probe_mods(OUT, MASK_ARGS, SCORE_ARGS, N_Q, N_K, MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr,
                SCORE_GRAD: tl.constexpr, TILE: tl.constexpr):
    """OUT[0] = the given mods evaluated at b = h = 0 on a TILE x TILE tile of indices clamped into [0, N_Q) x
    [0, N_K), as the kernels evaluate them: q_idx a column and kv_idx a row (forward, dQ, block mask cells), then
    transposed (dK/dV)."""
    b = tl.program_id(0)  # 0, a scalar tile as the kernels' b and h
    h = b
    rows = tl.minimum(tl.arange(0, TILE), N_Q - 1)
    cols = tl.minimum(tl.arange(0, TILE), N_K - 1)
    total = _probed_tile(rows[:, None], cols[None, :], b, h, MASK_ARGS, SCORE_ARGS, MASK_MOD, SCORE_MOD, SCORE_GRAD)
    total += _probed_tile(rows[None, :], cols[:, None], b, h, MASK_ARGS, SCORE_ARGS, MASK_MOD, SCORE_MOD,
                          SCORE_GRAD)
    tl.store(OUT, total)


def probe_mod(mod, q, k) -> None:
    """TypeError naming ``mod`` (a :class:`MaskMod` or :class:`ScoreMod` whose extra tensors were checked against
    q, k) unless the kernels can evaluate it: one small launch evaluates it on a tile of each orientation the
    kernels use, so a mod that calls a torch or Python function on tiles, returns a tile of another shape or a
    result of the wrong kind fails here, not as a Triton traceback from inside attention's kernels. Once per mod
    (its functions and scalars) and process, called where :func:`_unprobed` (never while torch.compile traces:
    dynamo cannot trace a launch); not where the kernels cannot run on q (they will not evaluate the mod either), nor for an empty call."""
    if not (q.numel() and k.numel()) or not _runtime.kernels_can_run(q, *mod.tensors):
        return
    score = isinstance(mod, mods.ScoreMod)
    extra = mods.kernel_extra(mod.key, mod.tensors)
    out = torch.empty(1, dtype=torch.float32, device=q.device)
    try:
        with _runtime.launch_device(out):
            _probe_mods[(1,)](out, () if score else extra, extra if score else (), q.shape[2], k.shape[2],
                              MASK_MOD=None if score else mod.fn, SCORE_MOD=mod.fn if score else None,
                              SCORE_GRAD=mod.grad_fn if score else None, TILE=PROBE_TILE)
    except TritonError as error:
        what = f"{mod.kind} {mod.fn.__name__}" + (f" or its grad_fn {mod.grad_fn.__name__}" if score else "")
        wrong_kind = mods.result_kind_error(error, **{"score_fn" if score else "mask_fn": mod.fn})
        raise wrong_kind or mods.unevaluable(what, error) from error
    _PROBED.add(mod.key)


def draw_rng(device: torch.device) -> torch.Tensor:
    """The int64 (seed, offset) pair of one dropout call, drawn from torch's default generator of ``device`` (so
    ``torch.manual_seed`` makes dropout reproducible); a tensor on the device, so nothing syncs."""
    return torch.randint(2**62, (2,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------ index-value verdicts
INDEX_BLOCK = 256
"""Index entries a check kernel reads per step (it is one program: index tensors are small)."""
PAIR_BLOCK = 32
"""Side of the tiles of entry pairs a check kernel compares for repeats."""


_CPU = torch.device("cpu")


def reads_at_once(device: torch.device) -> bool:
    """Whether the host reads a verdict on ``device`` as soon as it is stored: on CPU (no sync there) outside
    torch.compile's tracing; elsewhere a device assert judges it."""
    return device == _CPU and not torch.compiler.is_compiling()  # == rather than .type: no string made per call


_THREAD = threading.local()
"""This thread's reused CPU verdict (``new_verdict(..., reused=True)``)."""


def new_verdict(device: torch.device, reused: bool = False) -> torch.Tensor:
    """The int32 (2,) verdict a check kernel stores: [1 if every rule held else 0, a mask whose bit i is clear
    where rule i failed], so a verdict passes where every entry is nonzero. The kernel stores both, so a device
    assert's verdict is allocated unfilled; one the host reads at once starts as a pass (ones), so that a launch
    stubbed out (``python -m benchmarks overhead`` times the host path alone) reads as one.

    ``reused``: the caller reads the verdict (:func:`enforce`) before this thread can launch another check, so a
    verdict read at once is this thread's one buffer, not a new one (:func:`enforce` leaves it a pass); a verdict
    that leaves its function (a custom op's output) must not be reused."""
    if not reads_at_once(device):
        return torch.empty(2, dtype=torch.int32, device=device)
    if not reused:
        return torch.ones(2, dtype=torch.int32, device=device)  # device given: not torch's default device
    verdict = getattr(_THREAD, "verdict", None)
    if verdict is None:
        with torch.inference_mode(False):  # made under inference mode, calls outside it could not write to it
            verdict = _THREAD.verdict = torch.ones(2, dtype=torch.int32, device=device)
    return verdict


@triton.jit
def rule_bit(violations, bit: tl.constexpr):
    """``1 << bit`` where ``violations`` (a rule's count of them, or a value that must be 0) is nonzero, else 0."""
    return tl.where(violations != 0, 1 << bit, 0)


@triton.jit
def count(bad):
    """How many elements of the 1-D bool tensor ``bad`` are true (int32)."""
    return tl.sum(bad.to(tl.int32), 0)


@triton.jit
def store_verdict(VERDICT, failed):
    """The verdict of :func:`new_verdict` from ``failed``, the bits of the rules that failed."""
    tl.store(VERDICT, (failed == 0).to(tl.int32))
    tl.store(VERDICT + 1, ~failed)


@triton.jit
def unusable_pages(BLOCK_TABLE, stride_tb, batch, max_blocks, page_size, num_pages, ENDS, STARTS, n_new,
                   default_end, BLOCK: tl.constexpr):
    """How many entries of ``BLOCK_TABLE`` (batch, max_blocks) that hold a position below their row's end name no
    page of [0, num_pages). Row b ends at ENDS[b] - STARTS[b] + n_new (STARTS None: 0), or ``default_end``
    without ENDS; entries past a row's end are never read."""
    bad = 0
    for start in range(0, batch * max_blocks, BLOCK):
        entry = start + tl.arange(0, BLOCK)
        in_table = entry < batch * max_blocks
        row = entry // max_blocks
        block = entry % max_blocks
        end = default_end
        if ENDS is not None:
            end = tl.load(ENDS + row, mask=in_table, other=0) + n_new
            if STARTS is not None:
                end -= tl.load(STARTS + row, mask=in_table, other=0)
        used = in_table & (block.to(tl.int64) * page_size < end)  # a table's capacity may pass 2^31 positions
        page = tl.load(BLOCK_TABLE + row * stride_tb + block, mask=used, other=0)
        bad += count(used & ((page < 0) | (page >= num_pages)))
    return bad


def enforce(verdict: torch.Tensor, summary: str,
            rules: Callable[[], Sequence[Tuple[str, str, Optional[torch.Tensor]]]]) -> None:
    """Raise unless ``verdict`` (:func:`new_verdict`, stored by a check kernel) says every rule held.

    On a GPU, or while torch.compile traces, one ``torch._assert_async`` with ``summary`` (no host sync). On CPU
    (:func:`reads_at_once`) the verdict is read at once, and a failure raises ValueError with the first failed
    rule's message: ``rules()`` lists, rule bit by rule bit, (message naming the argument, that argument's name,
    its tensor (whose values the message shows) or None). Only a failing verdict is explained, so a valid call
    reads only the verdict, once."""
    if not reads_at_once(verdict.device):
        torch._assert_async(verdict[0], summary)
        return
    try:
        assert_on_device(verdict, summary)  # read at once on CPU (no sync): every entry nonzero is a pass
        return
    except ValueError:
        pass
    judged = verdict.clone()
    verdict.fill_(1)  # a pass again, should it be reused: a stubbed launch leaves it as it is
    for bit, (message, name, values) in enumerate(rules()):
        try:
            assert_on_device(judged[1] & (1 << bit), message)
        except ValueError:
            raise ValueError(message if values is None else f"{message}; got {name} = {_shown(values)}") from None
    raise ValueError(summary)


def _shown(values: torch.Tensor) -> str:
    """An index tensor's values for an error message (CPU, failure path only): listed, or torch's summary."""
    return str(values.tolist()) if values.numel() <= 32 else str(values)
