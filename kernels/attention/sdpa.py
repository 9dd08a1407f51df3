"""``scaled_dot_product_attention``: a drop-in for torch's function that runs the fused kernel where it can.

It recognises the masks Hugging Face, nn.MultiheadAttention and most code build for padded batches (a per-batch
key mask, AND optionally a top-left or bottom-right causal mask or a sliding window; bool, or the float mask of 0
and -inf or of 0 and the dtype's lowest value that equals it) and torch's ``CausalBias`` masks, and hands everything
else to torch's own function.
"""
from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from kernels import _runtime
from kernels.attention.checks import check_qkv, check_scale, key_bounds
from kernels.attention.ops import attention_op
from kernels.attention.plan import NO_TENSORS, LastTensor, VariantTensors, attention_variant

_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
"""torch's own SDPA (the builtin that ``F.scaled_dot_product_attention`` is), not that attribute's value at import: the
shim is assigned over it, so a reload of this module (IPython's autoreload) would otherwise capture the shim and
its fallback would recurse into itself."""


def _mask_plan(attn_mask: torch.Tensor, batch: int, heads: int, n_q: int, n_k: int, device: torch.device,
               dtype: torch.dtype) -> Optional[Tuple]:
    """(VariantTensors with the key range and padding mask, (causal, causal_shift, window_left, window_right) of
    the AttentionVariant) if an SDPA mask is exactly "a key mask per batch row, AND optionally a top-left or
    bottom-right causal mask", or "a key mask AND a band of diagonals" (a sliding window, as Hugging Face builds),
    the same for every head, else None. A bool mask (True: visible) or a float one of q's ``dtype`` whose entries
    are all 0 (visible) or -inf (hidden), which is the same mask to torch (nn.MultiheadAttention hands a padding
    or causal mask over as such a (B, H, 1 or Nq, Nk) float mask), or also the dtype's lowest finite value (the
    additive ``(1 - mask) * finfo.min`` masks): exp of a score plus it is 0 as of one plus -inf, so torch's
    result is the bool mask's in every row that sees a key, and a row that sees none but holds such a value is
    torch's mean of v (its scores all equal), not zeros: then None. Every candidate is compared on the device and
    the verdicts come back in one host read (a sync), made once per mask tensor (``LastTensor``)."""
    floating = attn_mask.dtype != torch.bool
    if floating and attn_mask.dtype != dtype:
        return None  # torch takes another dtype's mask or says why not
    if not 2 <= attn_mask.dim() <= 4 or attn_mask.device != device:
        return None
    if 0 in (batch, n_q, n_k):
        return None  # no entry to read the band's extreme offsets from; torch's result is empty or zeros
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if (mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads) or mask.shape[2] not in (1, n_q)
            or mask.shape[3] != n_k):
        return None
    first = mask[:, :1]
    verdicts = [(mask == first).all()] if mask.shape[1] > 1 else []  # every head's mask the first's
    if floating:  # 0 (visible) and -inf (hidden) only, or also the dtype's lowest value in rows that see a key
        visible, lowest = first == 0, first == torch.finfo(dtype).min
        hidden = (first == float("-inf")) | lowest
        rows_see_a_key = visible.any(-1) | ~lowest.any(-1)  # an all-lowest row is torch's mean of v, not zeros
        verdicts.append((visible | hidden).all() & rows_see_a_key.all())
        first = visible
    mask = first[:, 0].expand(batch, n_q, n_k)
    keys = mask.any(1)  # a key some query sees: under a causal mask the last query row sees every visible key
    offset = torch.arange(n_k, device=device) - torch.arange(n_q, device=device)[:, None]  # j - i
    # A band lo <= j - i <= hi (the kernel's window (hi - lo, 0) about the diagonal shift = hi) from the extreme
    # offsets the mask keeps; with no visible entry the band is empty and equals the plain key mask anyway.
    lo = torch.where(mask, offset, n_k).amin()
    hi = torch.where(mask, offset, -n_q).amax()
    candidates = (keys[:, None, :], keys[:, None, :] & (offset <= 0), keys[:, None, :] & (offset <= n_k - n_q),
                  keys[:, None, :] & (offset >= lo) & (offset <= hi))
    verdicts += [keys.all(), *((mask == c).all() for c in candidates)]
    *taken, all_keys, plain, top_left, bottom_right, band, lo, hi = torch.stack([*verdicts, lo, hi]).tolist()
    if not all(taken):
        return None
    tensors = NO_TENSORS if all_keys else VariantTensors(kv_bounds=key_bounds(keys),
                                                          pad=keys.view(torch.uint8).contiguous())
    for matches, causal, shift in ((plain, False, 0), (top_left, True, 0), (bottom_right, True, n_k - n_q)):
        if matches:
            return tensors, (causal, shift, -1, -1)
    if band:
        return tensors, (True, hi, hi - lo, 0)
    return None


_mask_plans = LastTensor(4)  # hybrid models alternate masks from layer to layer: each is read once


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)
"""Tensor types a launch (or torch.compile's and torch.export's tracing of it) takes. Other subclasses go to torch's
SDPA, which hands them the call: DTensor (tensor parallelism, torch's context_parallel; a launch cannot read its
data), jagged nested tensors, any ``__torch_function__`` subclass. ``CausalBias`` masks are read here (see
:func:`_causal_bias_shift`)."""


def _plain(t) -> bool:
    """Whether ``t`` (a tensor argument, or None) is None or of one of :data:`_PLAIN_TENSOR_TYPES` exactly."""
    return t is None or type(t) in _PLAIN_TENSOR_TYPES


def fused_backend_enabled() -> bool:
    """Whether ``torch.nn.attention.sdpa_kernel`` (or ``torch.backends.cuda.enable_*_sdp``) leaves a fused backend
    enabled (flash, memory-efficient or cuDNN): the kernel is one of those. With only MATH torch's math runs, as
    a user forcing it (a reference, double backward) expects. Under torch.compile the flags are read as the
    graph is traced."""
    return (torch._C._get_flash_sdp_enabled() or torch._C._get_mem_efficient_sdp_enabled()
            or torch._C._get_cudnn_sdp_enabled())


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """How the kernel runs this SDPA call, as ``attention_op``'s (tensors, variant) after q, k, v, or None for
    torch's fallback (which then accepts, or rejects with its own error, what the kernel does not take)."""
    causal_bias = isinstance(attn_mask, CausalBias)
    if (not (_plain(query) and _plain(key) and _plain(value) and (causal_bias or _plain(attn_mask)))
            or torch.jit.is_tracing()):
        return None  # torch.jit.trace records torch's op (the shim's Python would trace shapes as tensors)
    try:
        q_shape, k_shape = check_qkv(query, key, value)
        scale = check_scale(scale, q_shape[3])
    except (TypeError, ValueError):
        return None
    # key and value are on its device (check_qkv); torch's SDPA with only its math backend enabled, under
    # torch.func transforms (functorch's wrapped tensors, which a launch cannot read) and forward-mode AD (the
    # kernel has no jvp; torch's math backend has)
    if (dropout_p != 0.0 or not fused_backend_enabled() or not _runtime.kernels_can_run(query)
            or _runtime.forward_ad_active() and not torch.compiler.is_compiling()):
        return None
    if not (isinstance(is_causal, bool) and isinstance(enable_gqa, bool)):
        return None  # torch takes bools only (not 1, not numpy's bool, not a string): it raises its TypeError
    if q_shape[1] != k_shape[1] and not enable_gqa:
        return None
    if attn_mask is None:  # torch's is_causal is top-left aligned: shift 0
        return NO_TENSORS, attention_variant(is_causal, 0, scale)
    if causal_bias:
        shift = _causal_bias_shift(attn_mask, is_causal, q_shape[2], k_shape[2])
        return None if shift is None else (NO_TENSORS, attention_variant(True, shift, scale))
    if is_causal or not isinstance(attn_mask, torch.Tensor):
        return None  # torch rejects a mask together with is_causal; let it say so
    if attn_mask.requires_grad:
        return None  # a bias to differentiate: torch's. Asked before the memo, whose key requires_grad_() keeps
    if torch.compiler.is_compiling():
        # reading the mask is data-dependent: torch.export and fullgraph=True would fail on it and any other compile
        # would break the graph at every layer; torch's SDPA takes the traced mask inside the graph
        return None
    batch, heads, n_q, n_k, device = q_shape[0], q_shape[1], q_shape[2], k_shape[2], query.device
    # Under autocast torch adds a float mask cast to q's dtype (nn.MultiheadAttention's float32 masks): 0 and -inf
    # stay, and the mask's own lowest value becomes -inf or stays at least 65504 below any score (fp16's in bf16),
    # so the mask is judged in its own dtype, and memoised on itself (not on a cast made per call)
    device_type = "cuda" if query.is_cuda else "cpu"
    mask_dtype = (attn_mask.dtype if torch.is_autocast_enabled(device_type) and _autocast_casts(attn_mask, device_type)
                  else query.dtype)
    mask_plan = _mask_plans.get(attn_mask, (batch, heads, n_q, n_k, device, mask_dtype), _mask_plan, attn_mask,
                                batch, heads, n_q, n_k, device, mask_dtype)
    if mask_plan is None:
        return None
    tensors, (causal, shift, window_left, window_right) = mask_plan
    return tensors, attention_variant(causal, shift, scale, window_left, window_right)


def _causal_bias_shift(bias: CausalBias, is_causal: bool, n_q: int, n_k: int) -> Optional[int]:
    """The causal shift torch's ``CausalBias._dispatch`` gives ``bias`` (``causal_upper_left``/``causal_lower_right``)
    for q of length ``n_q`` and k of ``n_k``, or None where it does something else (raises with is_causal, or
    materialises a lower-right bias of other lengths than q's and k's). It runs an upper-left bias, or a square one,
    as ``is_causal=True`` whatever q's and k's lengths."""
    if is_causal:
        return None
    if bias.variant == CausalVariant.UPPER_LEFT or bias.seq_len_q == bias.seq_len_kv:
        return 0
    return n_k - n_q if (bias.seq_len_q, bias.seq_len_kv) == (n_q, n_k) else None


def as_autocast_takes(query: torch.Tensor, key, value):
    """query, key, value as torch's SDPA runs them: under autocast (SDPA is on its lower-precision list) the tensors
    autocast casts (floating, not float64, on autocast's device) in autocast's dtype, the rest as they are. One flag
    read outside autocast."""
    device_type = "cuda" if query.is_cuda else "cpu"  # other devices: torch's own SDPA runs (and autocasts)
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _autocast_casts(t, device_type) else t for t in (query, key, value))


def _autocast_casts(t, device_type: str) -> bool:
    """Whether autocast on ``device_type`` casts ``t`` to its lower precision (its rule: float64 stays float64)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and semantics, top-left
    ``is_causal``), safe to assign over it.

    Runs the kernel for 4-D (B, H, L, D) fp16/bf16/fp32 inputs with equal q/k/v head dims <= 256, no dropout, and
    either no mask or a mask that is exactly a per-batch key mask, optionally AND a causal (top-left or
    bottom-right) mask or a band of diagonals (a sliding window, i - w < j <= i style), the same for every head:
    bool, such as Hugging Face's padding and sliding-window masks (B, 1, Nq, Nk) or (B, 1, 1, Nk), or float in
    q's dtype (or any dtype autocast casts to q's) with only 0 and -inf entries, such as nn.MultiheadAttention's
    (B, H, 1 or Nq, Nk), or 0 and the dtype's lowest value (``(1 - mask) * finfo.min``) where every row sees a
    key: checking this reads the mask (one device sync for a new mask, none when a model's next layer passes the
    same unmodified mask tensor; without a mask there is none). While torch.compile traces, a call with such a
    mask is torch's SDPA in the graph. torch's ``causal_upper_left``/``causal_lower_right`` biases run the kernel
    without a read, compiled too (a lower-right one of other lengths than q's and k's, or with ``is_causal``,
    goes to torch's ``CausalBias`` dispatch).
    Everything else (other float masks, a mask requiring grad, other bool masks, dropout_p > 0, other ranks or
    shapes, inputs the kernels cannot run on in this process, tensor subclasses such as DTensor, torch.func
    transforms, forward-mode AD, torch.jit.trace, a mask under torch.compile or torch.export, an ``is_causal`` that
    is not a bool, ``sdpa_kernel`` leaving only the MATH backend, float64) calls torch's own function
    (``torch._C._nn.scaled_dot_product_attention``, whatever ``F``'s attribute holds); torch.jit.script compiles
    the shim as torch's op. Under autocast, as torch's, floating q, k, v other than float64 run in autocast's
    dtype (the result too).
    """
    if isinstance(query, torch.Tensor):
        query, key, value = as_autocast_takes(query, key, value)
    plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plan is None and isinstance(attn_mask, CausalBias):
        # torch's CausalBias takes the call only from F's attribute (its __torch_function__ compares the function
        # with it): with the shim assigned, the builtin ran on the bias's own storage (an uninitialised (variant,
        # L, S) tensor) as a float mask and returned a CausalBias
        return CausalBias._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                    enable_gqa=enable_gqa)
    if plan is None:
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return attention_op(query, key, value, *plan)[0]


# Assigned over F's, the shim is what TorchScript finds where torch's code calls SDPA (nn.MultiheadAttention's
# forward, which torch.jit.script compiles): it compiles it as torch's own op, as it did before the assignment.
# A private torch API: where a torch lacks it, scripting after the assignment fails as before, nothing else.
_register_builtin = getattr(getattr(torch.jit, "_builtins", None), "_register_builtin", None)
if _register_builtin is not None:
    _register_builtin(scaled_dot_product_attention, "aten::scaled_dot_product_attention")
