"""A small GPT (decoder-only causal language model) in the style of nanoGPT, with a switchable attention/norm backend.

Shapes: B batch, T tokens, C = n_embd, H query heads, Hkv key/value heads (grouped-query attention: each k/v head
serves H // Hkv query heads), D = C // H.

Backends (``GPTConfig.backend``, switchable after construction with :meth:`GPT.set_backend`):

- ``"reference"``: plain PyTorch, the truth the others are tested against: quadratic attention
  (``kernels.reference.attention``) and ``kernels.reference.layer_norm``.
- ``"triton"``: the fused kernels: ``kernels.attention`` (GQA and bottom-right causal masking in the kernel),
  ``kernels.attention_with_kvcache`` for decoding against a :class:`KVCache`, and ``kernels.layer_norm`` /
  ``kernels.add_layer_norm`` (the residual add before the second norm fused into it).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with ``torch.nn.functional.layer_norm``.

The parameters and state_dict keys do not depend on the backend, so weights move between them with
``load_state_dict``. ``GPTConfig.window`` makes every backend's attention a sliding window (Mistral's). The GPT
passes no attention dropout to any backend (``kernels.attention`` takes ``dropout_p``, but each backend would draw
its own mask), so the backends compute the same function in training too; dropout applies to the embeddings and
residual branches.
"""
import functools
import math
import numbers
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import distributed, reference

BACKENDS = ("reference", "triton", "sdpa")

def _check_number(name: str, value, kind, low, high=math.inf) -> None:
    """TypeError unless ``value`` is a ``kind`` (numbers.Integral or numbers.Real, never a bool); ValueError unless
    it is finite and in [low, high]."""
    integral = kind is numbers.Integral
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integral else 'a real number'}, got {type(value).__name__}")
    if not (low <= value <= high and math.isfinite(value)):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds if integral else 'finite and ' + bounds}, got {value}")


def _assert_in_range(name: str, t: torch.Tensor, bound: int, what: str, low: int = 0) -> None:
    """Every value of the int tensor ``t`` in [low, bound), asserted on its device: no host sync on CUDA (an
    asynchronous device assert), a RuntimeError naming ``name`` at once on CPU; an embedding lookup outside its
    table is never launched on CPU."""
    torch._assert_async(((t >= low) & (t < bound)).all(), f"{name}: {what} must be in [{low}, {bound})")


@dataclass
class GPTConfig:
    """A :class:`GPT`'s sizes (positive ints; ``n_layer`` may be 0), dropout probability, attention window and
    backend."""

    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (plain multi-head attention)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear layers and the LayerNorms
    window: Optional[int] = None  # sliding window: a token sees itself and the window - 1 before it; None: all
    backend: str = "reference"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_head", "n_kv_head", "n_embd"):
            _check_number(name, getattr(self, name), numbers.Integral, 1)
        _check_number("n_layer", self.n_layer, numbers.Integral, 0)
        _check_number("dropout", self.dropout, numbers.Real, 0.0, 1.0)
        if self.window is not None:
            _check_number("window", self.window, numbers.Integral, 1)
        for name, kind in (("bias", bool), ("backend", str)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with an optional bias; state_dict keys ``weight`` (and ``bias``) as nn.LayerNorm.

    ``backend`` is set by the owning :class:`GPT`; the math is ``(x - mean) / sqrt(var + eps) * weight + bias``.
    """

    def __init__(self, n_embd: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return kernels.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=self.eps)
        if self.backend == "sdpa":
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return reference.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); one fused kernel on the triton backend."""
        if self.backend == "triton":
            return kernels.add_layer_norm(x, residual, self.weight.shape, self.weight, self.bias, eps=self.eps)
        total = x + residual
        return self.forward(total), total


class KVCache:
    """Every layer's keys and values of the positions before the next forward, for generation: preallocated
    (B, capacity, Hkv, D) buffers (flash-attn's layout, which ``kernels.attention_with_kvcache`` appends to in
    place), allocated at the first write; ``length``, the positions filled in every layer, and ``seqlens``, the
    same count per batch row as a (B,) int32 tensor on the model's device (allocated by the first forward, also
    in a model without blocks): the decode kernel's cache_seqlens, which a compiled step reads and advances
    without the host (:meth:`GPT.decode_step`).

    The buffers and ``seqlens`` are marked static addresses for torch.compile, so that a
    ``mode="reduce-overhead"`` step's CUDA graph updates them in place rather than copying them in and out."""

    def __init__(self, capacity: int):
        _check_number("capacity", capacity, numbers.Integral, 1)
        self.capacity, self.length = capacity, 0
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.seqlens: Optional[torch.Tensor] = None

    def start(self, batch: int, device: torch.device) -> None:
        """Allocate ``seqlens`` for ``batch`` sequences on ``device`` at the first forward; ValueError if the cache
        holds another batch size: every backend's attention would read (or broadcast into) another batch's keys
        and values."""
        if self.seqlens is None:
            self.seqlens = _static(torch.full((batch,), self.length, dtype=torch.int32, device=device))
        elif self.seqlens.shape[0] != batch:
            raise ValueError(f"cache: built for batch size {self.seqlens.shape[0]}, got idx of batch size {batch} "
                             f"(a new batch needs a new KVCache)")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``layer``'s new k, v (B, T, Hkv, D) after the cached positions; return the layer's keys and
        values of all length + T positions: views of the buffers, or copies where they carry a graph (a cached
        forward with grad), since the attention saves them for its backward and the next forward's write into the
        buffers would make that backward refuse them (torch's in-place check)."""
        if layer == len(self.keys):
            shape = (k.shape[0], self.capacity, *k.shape[2:])
            self.keys.append(_static(k.new_empty(shape)))
            self.values.append(_static(v.new_empty(shape)))
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        keys, values = self.keys[layer][:, :end], self.values[layer][:, :end]
        return (keys.clone(), values.clone()) if keys.requires_grad or values.requires_grad else (keys, values)

    def advance(self, n: int) -> None:
        """Count ``n`` more positions filled in every layer: ``length`` on the host, ``seqlens`` on the device."""
        self.length += n
        if self.seqlens is not None:
            self.seqlens += n


def _check_cache(cache) -> None:
    """TypeError unless ``cache`` is None or a :class:`KVCache`."""
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")


def _static(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked as an input whose address stays put across compiled calls (unguarded: a new cache re-records
    the CUDA graph rather than recompiling)."""
    torch._dynamo.mark_static_address(t, guard=False)
    return t


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # flash-attn's (left, right) window, the form every attention function here takes; -1: unbounded
        self.window_size = (-1 if config.window is None else config.window - 1, 0)
        self.backend = "reference"
        self.context_parallel = None  # ring attention over this rank's shard, see GPT.set_context_parallel

    def forward(self, x, cache: Optional[KVCache] = None, layer: int = 0, probs: Optional[list] = None):
        """x (B, T, C) -> y (B, T, C). ``cache``: the earlier positions' keys/values, into which this layer
        (number ``layer``) writes its new ones.

        The T queries are the last T positions of the cache.length + T keys, so bottom-right causal masking is
        right both for a whole prompt (empty cache) and for decoding one token against the cache. With ``probs``
        (a list) the reference path runs and appends its (B, H, T, cache.length + T) attention probabilities.
        """
        if self.context_parallel is not None and (cache is not None or probs is not None):
            raise ValueError("context parallelism (GPT.set_context_parallel) takes neither a cache nor probs")
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, heads, D) here; the cache's layout
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if (cache is not None and layer < len(cache.keys) and self.backend == "triton" and probs is None
                and q.dtype is not torch.float64 and not (torch.is_grad_enabled() and q.requires_grad)):
            # decoding (this layer's buffers hold earlier positions): the kernel writes k, v into the cache in place
            # at each row's cache.seqlens, then attends to all of it. No host length is read, so a compiled step
            # traces once for every length. The decode kernel has no backward: a step that needs grad appends to
            # the cache and runs the differentiable kernel on all the cached keys, as the other backends do, and so
            # does a float64 model (kernels.attention runs torch's ops there; the decode kernel takes no float64).
            y = kernels.attention_with_kvcache(q, cache.keys[layer], cache.values[layer], k, v,
                                               cache_seqlens=cache.seqlens, causal=True, window_size=self.window_size)
        else:
            if cache is not None:
                k, v = cache.append(layer, k, v)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D), as the attention functions
            if probs is not None:
                y, p = reference.attention(q, k, v, causal=True, window_size=self.window_size, return_probs=True)
                probs.append(p)
            else:
                y = self._attend(q, k, v)
            y = y.transpose(1, 2)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

    def _attend(self, q, k, v):
        if self.context_parallel is not None:
            if self.backend != "triton":  # the ring is built of the fused kernels only
                raise RuntimeError(f"context parallelism needs the triton backend, not {self.backend!r}")
            return self.context_parallel(q, k, v)
        if self.backend == "triton":
            return kernels.attention(q, k, v, causal=True, window_size=self.window_size)
        if self.backend == "sdpa":
            n_q, n_k = q.shape[2], k.shape[2]
            # torch's is_causal is top-left aligned (bottom-right only when Nq == Nk; one query sees every key) and
            # has no window: a bool mask says the rest. bool(): under torch.export the lengths are symbolic, and
            # is_causal takes no SymBool (Nq and Nk of one forward without a cache are one symbol: no guard).
            causal = bool(n_q == n_k)
            plain = self.window_size[0] < 0 and (causal or n_q == 1)
            mask = None if plain else reference.window_mask(n_q, n_k, self.window_size, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plain and causal,
                                                  enable_gqa=True)
        return reference.attention(q, k, v, causal=True, window_size=self.window_size)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.)); the middle residual add is fused into ln_2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, probs=None):
        normed, x = self.ln_2.add_forward(self.attn(self.ln_1(x), cache, layer, probs), x)
        return x + self.mlp(normed)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = replace(config)  # its own: set_backend writes config.backend, another GPT may share config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embedding
        self.context_parallel = None  # (layout, group) under set_context_parallel
        self.register_load_state_dict_post_hook(GPT._retie_after_load)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the projections into the residual stream
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_backend(config.backend)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, keeping lm_head tied to wte: a conversion that makes new Parameters rather than
        setting ``.data`` (``to_empty`` after a meta-device init, meta to any device) makes one for each module's
        reference, which would untie them silently (two tensors trained and saved apart)."""
        tied = self.lm_head.weight is self.transformer.wte.weight
        super()._apply(fn, recurse)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # runs before the children load, which under load_state_dict(assign=True) give wte and lm_head a Parameter
        # each: note which one to keep, lm_head's (loaded last, its values are the ones a load into the tied model
        # keeps) unless the state_dict has only wte's (a checkpoint that dropped the tied copy, strict=False)
        if self.lm_head.weight is self.transformer.wte.weight:
            self._tie_to_lm_head = prefix + "lm_head.weight" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _retie_after_load(self, incompatible_keys) -> None:
        """Tie lm_head and wte again after a load that untied them (``assign=True``)."""
        to_lm_head = self.__dict__.pop("_tie_to_lm_head", None)
        if to_lm_head is not None:
            keep = self.lm_head.weight if to_lm_head else self.transformer.wte.weight
            self.lm_head.weight = self.transformer.wte.weight = keep

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def set_backend(self, backend: str) -> "GPT":
        """Switch every attention and norm to ``backend`` ("reference", "triton" or "sdpa"); weights untouched."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config.backend = backend
        for module in self.modules():
            if isinstance(module, (LayerNorm, CausalSelfAttention)):
                module.backend = backend
        return self

    def set_context_parallel(self, layout: Optional[str] = "zigzag", group=None) -> "GPT":
        """Make every attention ``kernels.distributed.ring_attention`` over ``group`` (the default process group
        for None; triton backend): each rank then runs :meth:`forward` on its ``layout`` shard of every sequence,
        its ``positions`` defaulting to the shard's. ``layout=None`` turns it off. The ring has no sliding window."""
        if layout is not None and layout not in distributed.LAYOUTS:
            raise ValueError(f"layout must be one of {distributed.LAYOUTS} or None, got {layout!r}")
        if layout is not None and self.config.window is not None:
            raise ValueError(f"context parallelism has no sliding window: config.window must be None, "
                             f"got {self.config.window}")
        attend = None if layout is None else functools.partial(distributed.ring_attention, causal=True, group=group,
                                                               layout=layout)
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.context_parallel = attend
        self.context_parallel = None if layout is None else (layout, group)
        return self

    def _shard_positions(self, n_local: int, device) -> torch.Tensor:
        """This rank's positions (n_local,) in its shard of a sequence of n_local * P tokens (set_context_parallel's
        layout and group; local arithmetic, no communication)."""
        layout, group = self.context_parallel
        world = torch.distributed.get_world_size(group)
        distributed._pieces(n_local * world, layout, world, "idx", local=True)  # the error names idx, not shard's x
        return distributed.shard(torch.arange(n_local * world, device=device), 0, layout, group)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                probs: Optional[list] = None, positions: Optional[torch.Tensor] = None):
        """idx (B, T) int64 token ids -> (logits (B, T, vocab), loss or None).

        ``targets`` (B, T): next-token ids (-1 = ignore) for the mean cross-entropy loss. ``cache``: a
        :class:`KVCache` of the positions before ``idx``; idx's keys and values are added to it. ``probs``: see
        :meth:`attention_maps`. ``positions`` (T,) int64: each token's position (default: past .. past + T - 1;
        under :meth:`set_context_parallel`, where idx is this rank's shard of sequences of T * P tokens, the
        shard's positions).

        Token ids outside [0, vocab_size), targets outside [-1, vocab_size) and positions outside [0, block_size)
        fail a device-side assert naming idx, targets or positions (on CPU a RuntimeError at once); targets that are
        not an int64 tensor of idx's shape, a TypeError or ValueError (a (T, B) one would otherwise flatten to
        wrong pairs silently); a cache built for another batch size, a ValueError.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise TypeError(f"idx must be a (B, T) int64 tensor, got {getattr(idx, 'dtype', type(idx))} "
                            f"of shape {tuple(getattr(idx, 'shape', ()))}")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.dtype != torch.long):
            raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        _check_cache(cache)
        past = 0 if cache is None else cache.length
        T = idx.shape[1]
        if past + T > self.config.block_size:
            raise ValueError(f"idx: {past} cached + {T} new tokens exceed block_size {self.config.block_size}")
        if cache is not None and past + T > cache.capacity:
            raise ValueError(f"idx: {past} cached + {T} new tokens exceed the cache's capacity {cache.capacity}")
        if positions is not None and (not isinstance(positions, torch.Tensor) or positions.dtype != torch.long):
            raise TypeError(f"positions must be an int64 tensor, got {getattr(positions, 'dtype', type(positions))}")
        if positions is not None and tuple(positions.shape) != (T,):
            raise ValueError(f"positions must have shape (T,) = ({T},), got {tuple(positions.shape)}")
        if cache is not None:
            cache.start(idx.shape[0], idx.device)
        _assert_in_range("idx", idx, self.config.vocab_size, "token ids")
        if targets is not None:
            _assert_in_range("targets", targets, self.config.vocab_size, "next-token ids (-1: ignored)", low=-1)
        if positions is None and self.context_parallel is not None:
            positions = self._shard_positions(T, idx.device)  # not 0..T-1: those are rank 0's first chunk only
        if positions is not None:
            _assert_in_range("positions", positions, self.config.block_size, "positions")
        pos = torch.arange(past, past + T, device=idx.device) if positions is None else positions
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, probs)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) of the token after idx (B, 1) int64, each row's newest token, placed at position
        ``cache.seqlens``: one decoding step of the triton backend against a :class:`KVCache` a forward has filled.

        Every length lives on the device: the step writes the new keys/values at ``cache.seqlens`` and attends
        through ``kernels.attention_with_kvcache``, then adds 1 to ``cache.seqlens`` in place. It reads no tensor
        value on the host and no changing Python number, so ``torch.compile(model.decode_step,
        mode="reduce-overhead", fullgraph=True)`` traces it once for every step (a CUDA graph on a GPU).
        ``cache.length`` (a host int) is therefore left to the caller, who adds 1 (as :meth:`generate` does).
        A full cache (position block_size or capacity) fails a device-side assert.
        """
        if self.config.backend != "triton":
            raise ValueError(f"decode_step runs the triton backend's decode kernel, not {self.config.backend!r}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] != 1 or idx.dtype != torch.long:
            raise TypeError(f"idx must be a (B, 1) int64 tensor, got {getattr(idx, 'dtype', type(idx))} "
                            f"of shape {tuple(getattr(idx, 'shape', ()))}")
        _check_cache(cache)
        if cache is None or cache.seqlens is None or len(cache.keys) != self.config.n_layer:
            raise ValueError("decode_step needs a cache a forward has filled (the prompt's keys and values)")
        cache.start(idx.shape[0], idx.device)
        _assert_in_range("idx", idx, self.config.vocab_size, "token ids")
        positions = cache.seqlens.long()[:, None]
        _assert_in_range("cache.seqlens", positions, self.config.block_size, "the new tokens' positions")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        cache.seqlens += 1
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> List[torch.Tensor]:
        """Per-layer attention probabilities, each (B, H, T, T), computed by the reference path (any backend)."""
        probs = []
        self.forward(idx, probs=probs)
        return probs

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); ``temperature=0`` means greedy (argmax).

        With ``use_cache`` each step feeds only the newest token and attends to the cached keys/values (one
        query against a :class:`KVCache`; on the triton backend through ``kernels.attention_with_kvcache``).
        Once the context would outgrow ``block_size``, the learned positions shift, so from then on every step
        rebuilds the cache from the last ``block_size`` tokens (a full prefill: the cache saves nothing there),
        exactly what the uncached path computes.
        ``top_k`` (None: no limit) keeps the k most likely tokens before sampling. ``compile`` (triton backend,
        with the cache) runs the steps after each prefill through ``torch.compile(self.decode_step,
        mode="reduce-overhead", fullgraph=True)``: one graph for every step, CUDA graphs on a GPU.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise TypeError(f"idx must be a (B, T) int64 tensor, got {getattr(idx, 'dtype', type(idx))} "
                            f"of shape {tuple(getattr(idx, 'shape', ()))}")
        if idx.shape[1] == 0:
            raise ValueError(f"idx: the prompt needs at least one token, got shape {tuple(idx.shape)}")
        _check_number("max_new_tokens", max_new_tokens, numbers.Integral, 0)
        _check_number("temperature", temperature, numbers.Real, 0.0)  # 0: greedy
        if top_k is not None:
            _check_number("top_k", top_k, numbers.Integral, 1)
        for name, flag in (("use_cache", use_cache), ("compile", compile)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        compiled_step = self._compiled_step(use_cache) if compile else None
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or cache.length == self.config.block_size:
                cache = KVCache(self.config.block_size) if use_cache else None
                logits = self(idx[:, -self.config.block_size:], cache=cache)[0][:, -1, :]
            elif compiled_step is None:
                logits = self(idx[:, -1:], cache=cache)[0][:, -1, :]
            else:
                logits = compiled_step(idx[:, -1:], cache)
                cache.length += 1  # decode_step advanced the device lengths only
            idx = torch.cat((idx, _next_token(logits, temperature, top_k)), dim=1)
        return idx

    def _compiled_step(self, use_cache: bool):
        """:meth:`decode_step` compiled as :meth:`generate` runs it (``compile=True``)."""
        if not use_cache or self.config.backend != "triton":
            raise ValueError(f"compile=True compiles the triton backend's cached decode_step: it needs "
                             f"use_cache=True and backend 'triton', got use_cache={use_cache}, "
                             f"backend {self.config.backend!r}")
        return torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True)


def _next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """(B, 1) int64 next tokens from the (B, vocab) logits: argmax for ``temperature == 0``, else sampled from
    softmax(logits / temperature) over the ``top_k`` most likely (None: all).

    The sampling math runs in float32 on logits less their row maximum, divided by a temperature of at least
    float32's smallest normal, so that a small temperature neither overflows a float16/bfloat16 model's logits nor
    divides by a 0 the temperature rounded to: the most likely tokens keep probability mass (inf / inf or 0 / 0
    would be NaN). float32, not float64, which some devices (MPS) lack."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
