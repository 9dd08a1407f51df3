"""Hugging Face ``transformers`` integration: the fused kernel as an attention-interface function, fed by a mask
function that never builds a (B, 1, Nq, Nk) mask for the patterns the kernel computes itself.

:func:`register_hf_attention` registers :func:`hf_attention` in transformers' ``AttentionInterface`` and
:func:`kernel_mask` in its ``AttentionMaskInterface`` under :data:`ATTENTION_NAME`; ``transformer.patch`` calls
it. transformers calls the mask function once per forward and mask type (not per layer), with the pattern as a
``mask_function`` closure; :func:`kernel_mask` recognises causal, sliding-window causal (calling the function on
probes, which torch.compile traces: :func:`_band_pattern`), bidirectional and packed (position_ids restarting at 0)
patterns and returns what the kernel needs (:class:`KernelMask`, or None for a purely causal batch). Any other
pattern gets transformers' own bool ``sdpa_mask``, which :func:`hf_attention` hands to
``kernels.scaled_dot_product_attention`` (the kernel where the mask is a key range per row, torch's SDPA otherwise)
or, while torch.compile traces, to torch's SDPA (reading the mask would break the graph).
transformers' continuous batching (``generate_batch``) runs the same function under
:data:`PAGED_ATTENTION_NAME` (:class:`ContinuousBatchingOnKernels`).

``transformers`` is imported only inside these functions: the rest of the package works without it.
"""
import copy
import dataclasses
import functools
import math
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.weak import WeakIdKeyDictionary

import kernels
from kernels._runtime import kernels_can_run
from kernels._validate import FLOAT_DTYPES
from kernels.attention.checks import key_bounds
from kernels.attention import sdpa as sdpa_shim
from kernels.attention.sdpa import as_autocast_takes
from kernels.attention.varlen import attention_varlen, token_sequences

ATTENTION_NAME = "fused_triton"
"""The name the kernel is registered under in transformers' attention and mask interfaces."""
PAGED_ATTENTION_NAME = "fused_triton_flash_paged"
"""The same functions' name while transformers' continuous batching runs (:class:`ContinuousBatchingOnKernels`).
Its continuous batching takes only "sdpa", "paged|eager" (both fed a dense (Nq, Nk) mask per batch) and names holding
"flash" (no mask: packed tokens with cu_seq_lens keywords, what :func:`hf_attention` runs on attention_varlen). No
"2" or "3" after "flash": transformers would look for flash-attn's own ``flash_attn_with_kvcache`` (block tables)."""

_NO_MATH = ("position_ids", "seq_idx", "use_cache", "cache_position", "layer_idx", "output_attentions",
            "output_hidden_states", "output_router_logits", "num_items_in_batch", "deterministic")
"""Keywords that do not change the attention math, which models pass along with the rest of their forward's
keywords (transformers' ``TransformersKwargs``): ignored. ``position_ids``: rotary positions are already applied,
and a packed batch (positions restarting at 0) reaches the kernel through the mask function (:func:`kernel_mask`)
or the cu_seq_lens keywords, as it reaches transformers' SDPA path; ``seq_idx`` (packed sequences' index for
Mamba layers) is never read by transformers' attention functions; the cache keywords, once the cache has been
updated; the ``output_*`` flags and ``num_items_in_batch`` (loss scaling) choose what the model returns (MoE
models pass ``output_router_logits=False`` on every call); ``deterministic`` (flash-attn's deterministic backward,
which ModernBERT passes on every call): the kernels' backward has no atomics, so it is deterministic anyway.
Attention weights are never returned, as in transformers' SDPA path, which also warns for
``output_attentions=True``."""
_SDPA_ONLY = ("position_bias", "cache")
"""Keywords that change the math, for transformers' own SDPA path (a relative position bias; a paged cache)."""
_EAGER_ONLY = ("head_mask",)
"""Keywords that change the math and that the kernel lacks, for the model's eager attention (a per-head factor on
the probabilities). Besides these and :data:`_SDPA_ONLY`, the keywords that change the math are
:func:`hf_attention`'s parameters, all run by the kernels: ``dropout`` (training), ``scaling``, ``is_causal``,
``sliding_window``, ``softcap``, ``s_aux`` (attention sinks) and the packed sequences' ``cu_seq_lens_q/k`` and
``max_length_q/k``. A keyword in none of these lists is taken to change the math: the eager attention runs it."""
_PAGED = ("read_index", "write_index", "logits_indices", "logits_processor_args")
"""Continuous batching's keywords that do not change the attention math once ``PagedAttentionCache.update`` has
run: it wrote the new keys/values at write_index and returned each sequence's keys gathered from read_index, in
position order, packed as cu_seq_lens_k says. (Its other block_table mode, which leaves the cache writes to the
kernel, is never chosen for :data:`PAGED_ATTENTION_NAME`.)"""


GENERATE_MASKS = "create_masks_for_generate"
"""The name of the function (transformers' own or a model's override) with which generate() builds its masks ahead
of a static cache's forward, which takes only tensor masks there (:func:`_for_generate`)."""
_KERNEL_MASKS = WeakIdKeyDictionary()
"""What :func:`kernel_mask` would have returned (a KernelMask or None) for each tensor mask it built for
generate() (:func:`_for_generate`), keyed by the tensor's identity: :func:`hf_attention` runs the kernel from it rather than
from the dense mask. A tensor that is not the same object (copied, or traced by torch.compile) is not found: a
traced one marked with :data:`KEY_RANGES` runs the decode kernel, any other takes the dense mask's path."""
KEY_RANGES = "_kernel_key_ranges"
"""The attribute that marks a tensor mask built for generate() whose rows each see one key range
(causal or not, a sliding window, left padding at most): its value is (causal, window). A compiled step gets the
mask as a traced tensor, which :data:`_KERNEL_MASKS` cannot find, but torch.compile reads (and guards on) a
tensor's attributes: :func:`hf_attention` then finds each row's range on the device (:func:`_key_ranges`)."""
DECODE_MAX_QUERIES = 8
"""Query tokens per call up to which :func:`hf_attention` runs ``kernels.attention_with_kvcache``: a generation step
(1) or assisted decoding's few candidate tokens. Longer queries (a prefill) run ``kernels.attention``, whose grid
tiles the query tokens."""


def use_kernel_attention(model: nn.Module) -> None:
    """Register the kernel with transformers and switch the ``PreTrainedModel`` to it, in place (again: a no-op)."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register_hf_attention()
    register_hf_attention(PAGED_ATTENTION_NAME)
    model.set_attn_implementation(ATTENTION_NAME)
    if not isinstance(vars(model).get("_kernel_registration"), _OnPatchedModel):
        model._kernel_registration = _OnPatchedModel()
    if hasattr(model, "init_continuous_batching") and not isinstance(  # generate_batch() and the other entries
            vars(model).get("init_continuous_batching"), ContinuousBatchingOnKernels):
        model.init_continuous_batching = ContinuousBatchingOnKernels(model, model.init_continuous_batching)


class _OnPatchedModel:
    """What :func:`use_kernel_attention` puts on a model (as ``_kernel_registration``, and the base of the callables
    it installs): unpickling one (``torch.load`` of a patched model, or a deep copy) registers the kernel with
    transformers, which the loaded model's ``_attn_implementation`` names. Objects, not closures: a patched model
    pickles and deep-copies, a copy's callables holding the copy and its own bound methods (a closure would keep
    the original's)."""

    names = (ATTENTION_NAME, PAGED_ATTENTION_NAME)

    def __getstate__(self):
        # never empty: pickle calls __setstate__ only for an object with state
        return {"names": self.names, **self.__dict__}

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in self.names:
            register_hf_attention(name)


class ContinuousBatchingOnKernels(_OnPatchedModel):
    """``init`` (the model's ``init_continuous_batching``, which ``generate_batch`` and
    ``continuous_batching_context_manager`` call) creating its manager with the model switched to
    :data:`PAGED_ATTENTION_NAME`, so every batch (packed prefills and decoding steps) runs :func:`hf_attention`;
    the manager's ``stop()`` switches it back to :data:`ATTENTION_NAME`. Unless the continuous-batching config
    asks for CUDA graphs (``use_cuda_graph`` or a padding interval), they are off: attention_varlen reads the
    sequence offsets on the host, which graph capture cannot hold. A model on another implementation is left
    alone."""

    def __init__(self, model: nn.Module, init: Callable):
        self.model, self.init = model, init

    def __call__(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        model, init = self.model, self.init
        if model.config._attn_implementation != ATTENTION_NAME:
            return init(generation_config, continuous_batching_config, workload_hints)
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        config = copy.deepcopy(continuous_batching_config or ContinuousBatchingConfig())
        if config.use_cuda_graph is None and not (config.q_padding_interval_size or config.kv_padding_interval_size):
            config.use_cuda_graph = False
        # The config's setter, not set_attn_implementation: that would try to load a flash-attn build for the name.
        model.config._attn_implementation = PAGED_ATTENTION_NAME
        try:
            manager = init(generation_config, config, workload_hints)
        except BaseException:
            model.config._attn_implementation = ATTENTION_NAME
            raise
        manager._original_attn_impl = ATTENTION_NAME  # what its stop() restores with set_attn_implementation
        return manager


def register_hf_attention(name: str = ATTENTION_NAME) -> None:
    """Register :func:`hf_attention` and :func:`kernel_mask` with transformers under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, hf_attention)
    AttentionMaskInterface.register(name, kernel_mask)


# ---------------------------------------------------------------------------------------------- mask function


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """What the kernel needs of a transformers attention mask, in place of the (B, 1, Nq, Nk) bool tensor.

    The key slots are the layer's cache in position order; the queries are the last Nq of the first ``n_keys``
    slots (later slots are empty, e.g. a static cache's), so causal masking is bottom-right on those slots.
    ``key_padding`` (B, n_keys) bool is True for real tokens (None: all are). ``window`` W is transformers' sliding
    window: query i sees keys j with i - W < j <= i. ``cu_seqlens`` (int32, total + 1 offsets over the B * Nq
    flattened tokens) and ``max_seqlen`` describe packed sequences, each attending only to itself.
    ``leftpad`` (B,) int32: each row's count of leading padding slots, when ``key_padding`` is exactly that (padding
    then real keys up to ``n_keys``), else None. ``dense()`` builds transformers' own bool mask, for the paths that
    need one (the model's eager attention).
    """
    causal: bool
    n_keys: int
    dense: Callable[[], torch.Tensor]
    key_padding: Optional[torch.Tensor] = None
    window: Optional[int] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    leftpad: Optional[torch.Tensor] = None


def _closure(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _same_code(fn, factory, *args) -> bool:
    """Whether ``fn`` is a closure made by transformers' ``factory`` (compared by code object)."""
    return getattr(fn, "__code__", None) is factory(*args).__code__


def _opaque(*args, **kwargs):
    return _OPAQUE


class _Opaque:
    """The value of a mask function at :class:`_Index` probes that is not a :class:`_Band` (it read a tensor, or
    compared an index with a constant): every operation on it gives it back."""

    __and__ = __rand__ = __or__ = __ror__ = __invert__ = __abs__ = __neg__ = _opaque
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _opaque
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __mod__ = to = _opaque
    # a torch op between a probe's value and a tensor (a mask function that read a tensor at the probes, such as a
    # packed batch's sequence ids) gives _OPAQUE too: torch.compile traces it so (``band & tensor`` stopped fullgraph)
    __torch_function__ = classmethod(_opaque)
    __hash__ = object.__hash__
    device = None


_OPAQUE = _Opaque()


class _Band:
    """The keys a mask function lets each query see, as the distances ``lo <= kv_idx - q_idx <= hi`` (infinite:
    unbounded; lo > hi: none): what the function returns at :class:`_Index` probes when it is made of comparisons
    of the two indices ``&``-ed together (transformers' and_masks). Supports what and_masks/or_masks do with their
    parts' values (``&``, ``|`` with or_masks' empty start, ``.to(device)``); the rest is :data:`_OPAQUE`."""

    device = None

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def to(self, *args, **kwargs):
        return self

    def __and__(self, other):
        if not isinstance(other, _Band):
            return _OPAQUE
        return _Band(max(self.lo, other.lo), min(self.hi, other.hi))

    def __or__(self, other):
        if isinstance(other, _Band) and self.lo > self.hi:  # or_masks starts from nothing
            return other
        return _OPAQUE  # a union of two ranges is not one range in general

    __rand__ = __ror__ = __invert__ = __abs__ = __neg__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _opaque
    __torch_function__ = classmethod(_opaque)  # as _Opaque's
    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("a mask function branched on an index comparison: it is not index-vectorizable")


_FLIPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


class _Index(int):
    """A probe for a mask function's argument ``kind`` ("batch", "head", "q" or "kv") plus an int ``offset``: a
    comparison of a "kv" probe with a "q" probe gives the :class:`_Band` of distances it allows, adding or
    subtracting a plain int shifts the offset, and anything else gives :data:`_OPAQUE`. Its int value 0 indexes
    tensors (a packed batch's sequence ids), whose values then make the function's value a tensor: not a band.
    (A Python branch on an index's value is not index-vectorizable: transformers itself cannot run such a
    function; _Band's ``__bool__`` raises.)"""

    @staticmethod
    def probe(kind: str, offset: int = 0) -> "_Index":
        index = _Index(0)  # attributes set after construction: dynamo cannot trace an int subclass's __new__
        index.kind, index.offset = kind, offset
        return index

    def _shift(self, other, sign: int):
        return _Index.probe(self.kind, self.offset + sign * other) if type(other) is int else _OPAQUE

    def __add__(self, other):
        return self._shift(other, 1)

    def __sub__(self, other):
        return self._shift(other, -1)

    def _compare(self, other, op: str):
        if not isinstance(other, _Index) or {self.kind, other.kind} != {"q", "kv"}:
            return _OPAQUE
        # kv + a OP q + b  <=>  kv - q OP b - a; with q on the left the comparison flips
        key, query = (self, other) if self.kind == "kv" else (other, self)
        bound = query.offset - key.offset
        op = op if self.kind == "kv" else _FLIPPED[op]
        return {"lt": _Band(-math.inf, bound - 1), "le": _Band(-math.inf, bound),
                "gt": _Band(bound + 1, math.inf), "ge": _Band(bound, math.inf)}[op]

    def __lt__(self, other):
        return self._compare(other, "lt")

    def __le__(self, other):
        return self._compare(other, "le")

    def __gt__(self, other):
        return self._compare(other, "gt")

    def __ge__(self, other):
        return self._compare(other, "ge")

    def new_ones(self, *args, **kwargs):
        return _Band(-math.inf, math.inf)

    def new_zeros(self, *args, **kwargs):
        return _Band(math.inf, -math.inf)

    __radd__ = __add__
    __rsub__ = __mul__ = __rmul__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __truediv__ = _opaque
    __neg__ = __abs__ = __invert__ = __and__ = __rand__ = __or__ = __ror__ = __eq__ = __ne__ = _opaque
    __hash__ = int.__hash__


def _band_pattern(mask_function):
    """(causal, window, None) of a mask function that keeps, for each query, one range of key distances that
    the kernel expresses (all keys; causal; a causal sliding window), found by calling it on :class:`_Index`
    probes: no closure is read, so torch.compile traces it (dynamo cannot read ``__closure__``). Else None."""
    try:
        band = mask_function(*map(_Index.probe, ("batch", "head", "q", "kv")))
    except Exception:  # noqa: BLE001  (a function the probes cannot run: transformers' own mask then)
        return None
    if not isinstance(band, _Band):
        return None
    if band.lo == -math.inf and band.hi == math.inf:
        return False, None, None
    if band.hi != 0 or band.lo > 0:
        return None
    return True, (None if band.lo == -math.inf else 1 - band.lo), None


def _pattern(mask_function):
    """(causal, window, packed sequence ids or None) of a transformers mask function this module can express
    without a dense mask, else None. Unknown functions (or a transformers version that builds them differently)
    give None, hence transformers' own mask: never a wrong one. A packed batch's pattern is found in eager only:
    its sequence ids are read from the closures, which a compiled forward cannot (its mask is then dense)."""
    from transformers import masking_utils as mu

    if mask_function is mu.bidirectional_mask_function:  # q_idx >= 0: a comparison with a constant to the probes
        return False, None, None
    pattern = _band_pattern(mask_function)
    if pattern is not None or torch.compiler.is_compiling() or not _same_code(mask_function, mu.and_masks):
        return pattern
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    first, second = parts
    if _same_code(second, mu.packed_sequence_mask_function, None):
        # transformers 5.24 remaps the indices to each sequence's positions (remap_positions_for_packed_sequence);
        # 5.17 has no such function and ands the flat-index pattern with the packing mask: the same mask for causal
        # and sliding-window causal patterns (index and position differences agree within a sequence).
        remap = getattr(mu, "remap_positions_for_packed_sequence", None)
        if remap is not None and _same_code(first, remap, None, None):
            first = _closure(first)["mask_function"]
        inner = _pattern(first)
        if inner is not None and inner[0] and inner[2] is None:  # causal (or sliding causal) within each sequence
            return True, inner[1], _closure(second)["packed_sequence_mask"]
    return None


def _segments(sequence_ids: torch.Tensor):
    """(cu_seqlens int32, max_seqlen) of the packed sequences of (B, S) per-row sequence ids, over the B * S
    flattened tokens (every row starts a sequence). One host read."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten().tolist() + [sequence_ids.numel()]
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    return torch.tensor(offsets, dtype=torch.int32, device=sequence_ids.device), max(lengths)


def _left_padding(padding: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) int32 leading padding slots of each row of a (B, N) key mask that is padding then real keys, else None.
    One host read."""
    real = padding.bool()
    leftpad = (~real).sum(1)
    if not torch.equal(real, torch.arange(real.shape[1], device=real.device) >= leftpad[:, None]):
        return None
    return leftpad.to(torch.int32)


def kernel_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None, **kwargs):
    """transformers' mask-interface function for the kernel (called as its ``sdpa_mask``, with the same
    arguments): None for a purely causal batch with no padding, a :class:`KernelMask` (a (B, n_keys) padding
    mask at most) for the other causal, sliding-window, bidirectional and packed patterns, and transformers'
    ``sdpa_mask`` (B, 1, Nq, Nk) bool tensor, never None, for everything else.

    ``attention_mask`` is the (B, past + Nq) 2-D mask (the encoder's (B, Nk) for cross-attention, whose pattern is
    bidirectional); key slot j holds position ``kv_offset + j``. For generate()'s masks built ahead of the forward
    (:func:`_for_generate`) it always returns transformers' mask, recording in :data:`_KERNEL_MASKS` what it would
    have returned otherwise (and marking it with :data:`KEY_RANGES` where that is one key range per row). No device
    sync except, per call, one ``all()`` of the 2-D mask (to return None when nothing is padded), one read of it to
    find left padding and one read of a static cache's length (all skipped while tracing), and one read of the
    sequence starts for packed batches.
    """
    from transformers.masking_utils import sdpa_mask

    sizes = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                 local_size=local_size)
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # a None would mean top-left
    dense = functools.partial(sdpa_mask, **sizes, **kwargs)
    pattern = _pattern(mask_function)
    if pattern is None or not isinstance(kv_offset, int):
        return dense()
    mask = _kernel_mask(*pattern, dense, kv_length, q_length, q_offset, kv_offset, attention_mask)
    # generate() builds its masks eagerly, before a compiled forward: a traced call is never for it
    if isinstance(mask, torch.Tensor) or torch.compiler.is_compiling() or not _for_generate():
        return mask
    tensor = dense().contiguous()  # generate() makes its masks contiguous: a copy would not be found
    _KERNEL_MASKS[tensor] = mask
    if mask is None:
        setattr(tensor, KEY_RANGES, (True, None))
    elif mask.cu_seqlens is None and (mask.key_padding is None or mask.leftpad is not None):
        setattr(tensor, KEY_RANGES, (mask.causal, mask.window))
    return tensor


def _for_generate(depth: int = 12) -> bool:
    """Whether generate() is building its masks ahead of the forward: :data:`GENERATE_MASKS` (transformers' function
    or a model's override) among the ``depth`` frames above :func:`kernel_mask`. The forward takes only tensor masks
    from it (transformers' mask preparation reads ``.ndim``), and generate() calls it on the model, so a model
    loaded with ``attn_implementation="fused_triton"`` after :func:`register_hf_attention` has no patched method
    to mark the call: the stack does (a few frames, once per mask, not per layer)."""
    frame = sys._getframe(2)
    while frame is not None and depth > 0:
        if frame.f_code.co_name == GENERATE_MASKS:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _kernel_mask(causal, window, packed, dense, kv_length, q_length, q_offset, kv_offset, attention_mask):
    """:func:`kernel_mask`'s result for a pattern :func:`_pattern` recognised."""
    from transformers.utils.import_utils import is_tracing

    if packed is not None:
        cu_seqlens, max_seqlen = _segments(packed)
        return KernelMask(causal, kv_length, dense, window=window, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if isinstance(q_offset, torch.Tensor) and not is_tracing(q_offset):
        q_offset = int(q_offset)  # a static cache keeps its length on the device; the key count must be an int
    if not causal:
        # every key slot the 2-D mask covers (sdpa_mask pads it with False), all kv_length without one: the queries'
        # positions do not matter, and cross-attention's keys (the encoder's) outnumber the decoder's queries
        end = kv_offset + kv_length if attention_mask is None else attention_mask.shape[-1]
    elif attention_mask is not None:
        end = attention_mask.shape[-1]  # one past the last real key's position
        if isinstance(q_offset, int) and end != q_offset + q_length:
            return dense()  # a 2-D mask not of the documented (B, past + Nq) size
    elif isinstance(q_offset, int):
        end = q_offset + q_length
    else:
        return dense()  # a traced static cache without a 2-D mask: where its real keys end is only on the device
    n_keys = min(end, kv_offset + kv_length) - kv_offset
    padding = None if attention_mask is None else attention_mask[:, kv_offset:kv_offset + n_keys]
    if padding is not None and not is_tracing(padding) and bool(padding.all()):
        padding = None
    if causal and window is None and padding is None and n_keys == kv_length:
        return None
    leftpad = None if padding is None or is_tracing(padding) else _left_padding(padding)
    return KernelMask(causal, n_keys, dense, key_padding=padding, window=window, leftpad=leftpad)


# ----------------------------------------------------------------------------------------- attention function


def _dense(attention_mask):
    return attention_mask.dense() if isinstance(attention_mask, KernelMask) else attention_mask


def _given(kwargs: dict, names) -> list:
    """The names of ``names`` whose keyword in ``kwargs`` is not None, sorted."""
    return sorted(name for name in names if kwargs.get(name) is not None)


_WARNED = set()


def _warn_once(message: str) -> None:
    """A UserWarning, at :func:`hf_attention`'s caller, the first time this process meets ``message``: the path is
    chosen per call, and a model makes the same call in every layer and step. Not while torch.compile traces:
    dynamo cannot trace ``warnings.warn`` (a graph break, which stops ``fullgraph=True``, e.g. generate()'s
    compiled static-cache steps of a model with attention sinks)."""
    if message not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)  # above _warn_once, hf_attention and _one_head_dim's wrapper


def _fallback(keywords: list, why: str, path: str) -> str:
    return (f"hf_attention: the kernel does not take the keywords {keywords} ({why}): these calls run {path}, "
            "not the kernel")


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The model's own ``eager_attention_forward``, fed the additive float mask it expects."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"hf_attention: keywords {sorted(kwargs)} are not understood by the kernel and "
                        f"{type(module).__module__} has no eager_attention_forward to run them")
    attention_mask = _dense(attention_mask)
    if attention_mask is None and query.shape[2] > 1 and (getattr(module, "is_causal", True) if is_causal is None
                                                          else is_causal):
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                    device=query.device).tril(key.shape[2] - query.shape[2])[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _reference_attention(query, key, value, attention_mask, dropout, scaling, causal, sliding_window, softcap, s_aux,
                         cu_seq_lens_q, cu_seq_lens_k) -> torch.Tensor:
    """What the kernels would compute, by ``kernels.reference.attention`` in torch ops, for inputs of a dtype they
    do not take (float64): the packed sequences' blocks of ``cu_seq_lens_q/k`` (built on the device) where they are
    given, with the sliding window (a traced mask: transformers' own, as the kernels' path), else transformers' own
    mask where there is one (:class:`KernelMask`'s ``dense()``), else causal with the sliding window. Dropout draws
    its keep-mask from torch's generator. Returns (B, Q, H, D)."""
    from transformers.utils.import_utils import is_tracing

    mask = _dense(attention_mask)
    window = (-1, -1)
    # a sliding-window KernelMask (use_cache's plain pattern) beside them: its dense mask spans the sequences
    if cu_seq_lens_q is not None and not (isinstance(attention_mask, torch.Tensor) and is_tracing(attention_mask)):
        _check_packed_mask(attention_mask)
        mask = _packed_mask(cu_seq_lens_q, cu_seq_lens_k, query.shape[2], key.shape[2], causal, sliding_window)
    elif mask is None:
        window = _window(sliding_window, causal)
    causal = causal and mask is None
    keep = None
    if dropout > 0:
        scores = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        keep = torch.rand(scores, device=query.device) >= dropout
    out = kernels.reference.attention(query, key, value, causal, scaling, mask, window_size=window,
                                      softcap=softcap or 0.0, sinks=s_aux, dropout_mask=keep, dropout_p=dropout)
    return out.transpose(1, 2).contiguous()


def _check_packed_mask(attention_mask) -> None:
    """ValueError unless the cu_seq_lens keywords (packed sequences) can run beside ``attention_mask``: none, or a
    :class:`KernelMask` of packed sequences or of the plain (sliding) causal pattern without padding. transformers
    finds packing itself only without a cache: with one (use_cache's default) the mask is that plain pattern, and
    the keywords alone say where sequences start."""
    if attention_mask is not None and not (isinstance(attention_mask, KernelMask) and (
            attention_mask.cu_seqlens is not None or attention_mask.key_padding is None)):
        raise ValueError("hf_attention: cu_seq_lens_q (packed sequences) together with a padding mask")


def _packed_mask(cu_seq_lens_q, cu_seq_lens_k, n_q: int, n_k: int, causal: bool, sliding_window: Optional[int]):
    """The (1, 1, n_q, n_k) bool mask of packed sequences (offsets ``cu_seq_lens_q/k``): each query sees its own
    sequence's keys, bottom-right causal and within transformers' sliding window W where given. No host read."""
    def sequence_positions(offsets, n):
        sequence, position = token_sequences(offsets, n)
        return sequence, position, (offsets[1:] - offsets[:-1]).long()[sequence]

    seq_q, pos_q, len_q = sequence_positions(cu_seq_lens_q, n_q)
    seq_k, pos_k, len_k = sequence_positions(cu_seq_lens_k, n_k)
    diagonal = pos_q[:, None] + len_k[None, :] - len_q[:, None]  # each sequence's bottom-right diagonal
    visible = seq_q[:, None] == seq_k[None, :]
    if causal:
        visible &= pos_k[None, :] <= diagonal
        if sliding_window is not None:
            visible &= pos_k[None, :] > diagonal - sliding_window
    return visible[None, None]


def _window(sliding_window: Optional[int], causal: bool = True):
    """transformers' causal sliding window W (query i sees keys i - W < j <= i) as the kernel's window_size.
    Without causal masking transformers has two conventions (|i - j| <= W in its masks, < W in its flash-attention
    path), so that raises."""
    if sliding_window is None:
        return -1, -1
    if not causal:
        raise NotImplementedError("hf_attention: sliding_window without causal masking and without a mask")
    return sliding_window - 1, 0


def _packed(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scaling, **variants):
    """attention_varlen over the B * S flattened tokens of (B, H, S, D) views; returns (B, S, H, D)."""
    flat = [t.transpose(1, 2).flatten(0, 1) for t in (query, key, value)]
    out = attention_varlen(*flat, cu_seqlens_q, cu_seqlens_k, int(max_q), int(max_k), causal, scaling, **variants)
    return out.view(query.shape[0], query.shape[2], *out.shape[1:])


def _packed_decode(query, key, value, cu_seqlens_k, max_k, causal, scaling, window, softcap):
    """``kernels.attention_with_kvcache`` for B packed sequences of one query each, query (1, H, B, D), against
    their keys packed in key/value (1, Hkv, total_k, D) as cu_seqlens_k (int32, B + 1) says: the packed keys are
    read in place as a paged cache of one-token pages, row b's block table the token offsets cu_seqlens_k[b] + p
    (a (B, max_k) int32 table: linear in the keys). Returns (1, B, H, D)."""
    positions = torch.arange(int(max_k), dtype=torch.int32, device=cu_seqlens_k.device)
    block_table = (cu_seqlens_k[:-1, None] + positions).clamp_max(key.shape[2] - 1)  # slots past a row: not read
    k_cache, v_cache = (t[0].transpose(0, 1)[:, None] for t in (key, value))  # (total_k, 1, Hkv, D)
    out = kernels.attention_with_kvcache(query[0].transpose(0, 1)[:, None], k_cache, v_cache,
                                         cache_seqlens=cu_seqlens_k.diff(), block_table=block_table, causal=causal,
                                         scale=scaling, window_size=window, softcap=softcap or 0.0)
    return out.transpose(0, 1)


def _mask_window(sliding_window: Optional[int], window: Optional[int]):
    """The kernel's window_size for a mask made for transformers' ``window``; ValueError if the call's
    ``sliding_window`` is another."""
    if sliding_window is not None and sliding_window != window:
        raise ValueError(f"hf_attention: sliding_window={sliding_window} but the mask is for window {window}")
    return _window(window)


def _key_ranges(mask: torch.Tensor, batch: int):
    """(cache_seqlens, cache_leftpad) (B,) int32 of a (B or 1, 1, Q, K) bool mask whose rows each see one key
    range: one past the last key any query of the row sees, and the first; computed on the device (no host read,
    so it traces). A row that sees no key gets the empty range [0, 0)."""
    bounds = key_bounds(mask.any(2)[:, 0].expand(batch, -1))
    return bounds[:, 1].contiguous(), bounds[:, 0].contiguous()


def _decode(query, key, value, seqlens, leftpad, causal: bool, scaling, window, softcap) -> torch.Tensor:
    """``kernels.attention_with_kvcache`` over query (B, H, Q, D) against key/value (B, Hkv, K, D) read in place as
    a cache (a static one preallocated past the filled slots) already holding the new tokens: no k/v to append,
    row b's keys are slots [leftpad[b], seqlens[b]) (an int or (B,) int32 on the device). Returns (B, Q, H, D)."""
    return kernels.attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          cache_seqlens=seqlens, cache_leftpad=leftpad, causal=causal, scale=scaling,
                                          window_size=window, softcap=softcap or 0.0)


def _decode_kernel_takes(query, key, value, dropout: float, s_aux) -> bool:
    """Whether ``kernels.attention_with_kvcache`` can run this call: nothing it lacks (a backward, dropout, sinks)
    and this process's kernels run on these tensors."""
    tensors = (query, key, value)
    return (not dropout and s_aux is None and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and kernels_can_run(*tensors))


def _one_head_dim(attention):
    """``attention`` (an attention-interface function) for a value head dim Dv other than q's and k's D, as
    transformers' flash-attention path runs it (the kernels take one head dim, as flash-attn 2's): zeros appended to
    v (Dv < D, MLA's DeepSeek V2/V3 and their kin) add output columns that are cut off again, and zeros appended to
    q and k (Dv > D) add nothing to q . k. ``scaling`` None becomes q's own 1/sqrt(D) first. The zeros cost a copy
    of the tensors padded; equal dims pass straight through."""
    @functools.wraps(attention)
    def run(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *args, **kwargs):
        head_dim, value_dim = query.shape[-1], value.shape[-1]
        if value_dim == head_dim:
            return attention(module, query, key, value, attention_mask, dropout, scaling, *args, **kwargs)
        scaling = head_dim ** -0.5 if scaling is None else scaling
        if value_dim < head_dim:
            value = nn.functional.pad(value, (0, head_dim - value_dim))
        else:
            query, key = (nn.functional.pad(t, (0, value_dim - head_dim)) for t in (query, key))
        out, weights = attention(module, query, key, value, attention_mask, dropout, scaling, *args, **kwargs)
        return out[..., :value_dim], weights
    return run


def _few_queries(query: torch.Tensor) -> bool:
    """Whether query's (B, H, Nq, D) Nq is at most :data:`DECODE_MAX_QUERIES` (the decode kernel's case). A symbolic
    Nq (torch.export with a dynamic length) whose bound is unknown is not: comparing it would pin the exported
    length to <= 8 or > 8, and the general kernel takes any length."""
    return statically_known_true(query.shape[2] <= DECODE_MAX_QUERIES)


@_one_head_dim
def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                 dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                 sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                 s_aux: Optional[torch.Tensor] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                 cu_seq_lens_k: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                 max_length_k: Optional[int] = None, **kwargs):
    """transformers' attention-interface function, running ``kernels.attention`` (``attention_varlen`` for
    packed sequences, ``attention_with_kvcache`` for decoding steps).

    query (B, H, Q, D), key/value (B, Hkv, K, D) (non-contiguous views; GQA stays unrepeated). ``attention_mask``
    is what :func:`kernel_mask` returned: None (causal as ``is_causal``, else ``module.is_causal``, bottom-right),
    a :class:`KernelMask`, or a bool (B, 1, Q, K) tensor: one recorded in :data:`_KERNEL_MASKS` runs as its
    KernelMask, any other through ``kernels.scaled_dot_product_attention`` (torch's SDPA for masks that are not a
    key range per row, and for dropout). Up to :data:`DECODE_MAX_QUERIES` queries against keys padded on the left
    at most run ``attention_with_kvcache`` when no grad is needed (:func:`_decode_kernel_takes`): the keys are read
    in place as its cache, slots [leftpad, n_keys) per row, e.g. a static cache's preallocated tensor; in a
    compiled step (generate() compiles a static cache's steps) the mask is a traced tensor, and one marked
    :data:`KEY_RANGES` runs it with each row's range found on the device (cache_seqlens as a tensor).
    ``sliding_window`` (causal window of W keys, (W - 1, 0)), ``softcap``, ``s_aux`` (attention sinks) and
    ``dropout`` go to the kernel; ``cu_seq_lens_q/k`` with ``max_length_q/k`` (B = 1, the packed tokens: padding-free
    training, and continuous batching, whose :data:`_PAGED` keywords come along) run attention_varlen, or
    ``attention_with_kvcache`` on the packed keys (:func:`_packed_decode`) when every sequence has one query and
    no grad is needed. Calls with a keyword of :data:`_SDPA_ONLY` run transformers' SDPA attention, and any other
    keyword that is not None and not in :data:`_NO_MATH` (:data:`_EAGER_ONLY`, or one unknown here) the model's
    eager attention: no keyword that may change the math is ever dropped. Either fallback warns once per process.
    A value head dim other than q's (MLA: DeepSeek V2/V3, ...) runs with zeros appended (:func:`_one_head_dim`).
    Returns (out (B, Q, H, Dv), None).
    """
    sdpa_only = _given(kwargs, _SDPA_ONLY)
    if sdpa_only:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _warn_once(_fallback(sdpa_only, "they change the attention math", "transformers' SDPA attention"))
        return sdpa_attention_forward(module, query, key, value, _dense(attention_mask), dropout, scaling, is_causal,
                                      sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, **kwargs)
    if kwargs.get("block_table") is not None:
        raise NotImplementedError("hf_attention: continuous batching's block_table mode (the kernel writing the "
                                  "paged cache itself); its index mode runs the kernels")
    ignored = _NO_MATH + (_PAGED if cu_seq_lens_q is not None else ())
    eager_only = _given(kwargs, [name for name in kwargs if name not in ignored])
    if eager_only:
        why = ("they change the attention math" if set(eager_only) <= set(_EAGER_ONLY)
               else "unknown to it, they may change the attention math")
        _warn_once(_fallback(eager_only, why, f"{type(module).__module__}'s eager attention"))
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, **kwargs)
    if query.dtype not in FLOAT_DTYPES:  # float64: the package's torch-op attention, as the norms run torch's ops
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return _reference_attention(query, key, value, attention_mask, dropout, scaling, causal, sliding_window,
                                    softcap, s_aux, cu_seq_lens_q, cu_seq_lens_k), None
    if kwargs.get("output_attentions"):
        _warn_once("hf_attention: output_attentions=True, but the kernel computes no attention weights: they are "
                   "None, as in transformers' SDPA path (attn_implementation='eager' returns them)")
    from transformers.utils.import_utils import is_tracing

    # as transformers' SDPA path: under autocast a fp32 model's rotary gives fp32 q and k but a bf16/fp16 v
    query, key, value = as_autocast_takes(query, key, value)
    traced_mask = isinstance(attention_mask, torch.Tensor) and is_tracing(attention_mask)
    if isinstance(attention_mask, torch.Tensor) and not traced_mask:
        attention_mask = _KERNEL_MASKS.get(attention_mask, attention_mask)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    variants = dict(softcap=softcap or 0.0, sinks=s_aux, dropout_p=dropout)
    # A traced mask with cu_seq_lens: transformers' own, which under torch.compile always ands in its packed-sequence
    # check (position_ids, no cache) and may hold more (padding, chunks) that no probe can read there; it runs as
    # any traced mask below (torch's SDPA, transformers' SDPA path's result)
    if cu_seq_lens_q is not None and not traced_mask:
        _check_packed_mask(attention_mask)
        window = _window(sliding_window, causal)
        if (max_length_q == 1 and query.shape[2] == cu_seq_lens_q.shape[0] - 1
                and _decode_kernel_takes(query, key, value, dropout, s_aux)):  # one query per sequence
            return _packed_decode(query, key, value, cu_seq_lens_k, max_length_k, causal, scaling, window,
                                  softcap), None
        out = _packed(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, causal, scaling,
                      window_size=window, **variants)
        return out, None
    ranges = getattr(attention_mask, KEY_RANGES, None) if isinstance(attention_mask, torch.Tensor) else None
    if (ranges is not None and _few_queries(query) and attention_mask.shape[-1] == key.shape[2]
            and _decode_kernel_takes(query, key, value, dropout, s_aux)):
        # a traced step of a compiled generate(): each row's key range is read off the mask on the device
        seqlens, leftpad = _key_ranges(attention_mask, query.shape[0])
        return _decode(query, key, value, seqlens, leftpad, ranges[0], scaling,
                       _mask_window(sliding_window, ranges[1]), softcap), None
    if isinstance(attention_mask, torch.Tensor):  # transformers' own mask: a pattern kernel_mask did not take
        if softcap or s_aux is not None:
            given = ["softcap"] * bool(softcap) + ["s_aux"] * (s_aux is not None)
            _warn_once(_fallback(given, "with transformers' dense mask, which kernels.scaled_dot_product_attention "
                                        "takes without them", f"{type(module).__module__}'s eager attention"))
            return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                    softcap=softcap, s_aux=s_aux)
        # traced (torch.compile): torch's SDPA with the mask, as transformers' SDPA path; the drop-in's reading of
        # it would break the graph at every layer (its memo does not hold while tracing) and stop fullgraph
        sdpa = sdpa_shim._TORCH_SDPA if is_tracing(attention_mask) else kernels.scaled_dot_product_attention
        out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None:
        n_keys, padding, leftpad, window = key.shape[2], None, None, _window(sliding_window, causal)
    else:
        window = _mask_window(sliding_window, attention_mask.window)
        if attention_mask.cu_seqlens is not None:
            cu, longest = attention_mask.cu_seqlens, attention_mask.max_seqlen
            out = _packed(query, key, value, cu, cu, longest, longest, True, scaling, window_size=window, **variants)
            return out, None
        causal, n_keys = attention_mask.causal, attention_mask.n_keys
        padding, leftpad = attention_mask.key_padding, attention_mask.leftpad
        if key.shape[2] < n_keys:
            raise ValueError(f"hf_attention: the mask covers {n_keys} key slots but key has {key.shape[2]}")
    if (_few_queries(query) and (padding is None or leftpad is not None)
            and _decode_kernel_takes(query, key, value, dropout, s_aux)):
        return _decode(query, key, value, n_keys, leftpad, causal, scaling, window, softcap), None
    out = kernels.attention(query, key[:, :, :n_keys], value[:, :, :n_keys], causal, scaling, key_padding_mask=padding,
                            window_size=window, **variants)
    return out.transpose(1, 2).contiguous(), None
