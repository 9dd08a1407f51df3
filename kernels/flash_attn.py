"""flash-attn 2.x's functions, with its names, argument order, defaults, layouts and return conventions, over the
Triton kernels of ``kernels/attention/``: code written for ``flash_attn`` can import them from here.

Differences from flash-attn 2.x (``flash_attn_with_kvcache``):

- Wider inputs: fp32 as well as fp16/bf16 (fp32 dots are IEEE on a GPU unless
  ``torch.backends.cuda.matmul.allow_tf32``); any strides; rotary_dim any even number <= the head dim (flash-attn:
  a multiple of 16); rotary_cos/rotary_sin of any float dtype (flash-attn: q's); any page size (flash-attn: a
  multiple of 256); ``cache_leftpad`` with a paged cache (flash-attn refuses the pair).
- ``alibi_slopes`` raises NotImplementedError.
- Stricter checks, before anything runs: an int ``cache_seqlens`` must leave room for the new keys, the cache needs
  at least B rows without ``cache_batch_idx``, inputs that require grad raise while grad mode is on (flash-attn
  returns a result without a graph), bad shapes and dtypes raise TypeError/ValueError rather than a CUDA error.
- The new keys/values are appended, and q and the keys rotated, by a launch before the attention kernel (flash-attn
  does it inside its attention kernel); the results are the same.
- The split heuristic is this package's (``kernels.attention.decode.choose_splits``), not flash-attn's.
"""
from typing import Optional, Union

import torch

from kernels.attention.decode import attention_with_kvcache


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2.x's ``flash_attn_with_kvcache``: append k/v to the cache in place at cache_seqlens (rotating
    them, and q, when rotary_cos/rotary_sin are given), then attend q to each row's cache.

    q (batch_size, seqlen, nheads, headdim); k_cache, v_cache (batch_size_cache, seqlen_cache, nheads_k, headdim),
    or (num_blocks, page_block_size, nheads_k, headdim) with block_table (batch_size, max_num_blocks_per_seq)
    int32; k, v (batch_size, seqlen_new, nheads_k, headdim). See
    :func:`kernels.attention.decode.attention_with_kvcache` for every argument and the math.

    Returns out (batch_size, seqlen, nheads, headdim), and with ``return_softmax_lse`` also softmax_lse
    (batch_size, nheads, seqlen) float32: the natural-log logsumexp of each row's scaled scores, +inf for a row
    that sees no key (flash-attn's convention; ``kernels.attention_with_kvcache`` gives -inf there).
    """
    out, lse = attention_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, causal=causal, scale=softmax_scale,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits, return_lse=True)
    if not return_softmax_lse:
        return out
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))
