"""Malformed input to the public functions gets a TypeError/ValueError naming the argument before anything
launches: the cases a fuzz of every entry point (one bad argument at a time) found reaching torch's or Triton's
internals, or passing silently."""
import math

import numpy as np
import pytest
import torch
import triton

import kernels
from kernels import flash_attn
from kernels.attention.block_mask import MaskMod, create_block_mask
from kernels.attention.mods import alibi_score, document_mask, prefix_lm_mask, softcap_score

B, H, N, D = 1, 2, 4, 16


def _sparse(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse()


def _nested(t: torch.Tensor) -> torch.Tensor:
    """A nested tensor of t's rows along dim 0 (``.shape`` raises on it)."""
    return torch.nested.nested_tensor(list(t.unbind(0)))


LAYOUTS = {"sparse": (_sparse, "sparse_coo"), "nested": (_nested, "nested")}
ONE_DIM = ("varlen cu_seqlens_q", "kvcache cache_seqlens", "layer_norm weight", "document_mask doc_ids",
           "prefix_lm_mask prefix_lengths", "alibi_score slopes")
"""The entries whose argument is 1-D: no nested tensor of it."""


def _dense_calls(device):
    """(argument name, function of that argument's value) per entry point, the other arguments valid."""
    x = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    q, k, v = x(B, H, N, D), x(B, H, N, D), x(B, H, N, D)
    packed = x(6, H, D)
    offsets = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    q_seq, cache = x(B, 1, H, D), x(B, 8, H, D)
    seqlens = torch.tensor([3], dtype=torch.int32, device=device)
    return {
        "attention q": ("q", q, lambda t: kernels.attention(t, k, v)),
        "attention v": ("v", v, lambda t: kernels.attention(q, k, t)),
        "varlen q": ("q", packed, lambda t: kernels.attention_varlen(t, packed, packed, offsets, offsets, 4, 4)),
        "varlen k": ("k", packed, lambda t: kernels.attention_varlen(packed, t, packed, offsets, offsets, 4, 4)),
        "varlen cu_seqlens_q": ("cu_seqlens_q", offsets,
                                lambda t: kernels.attention_varlen(packed, packed, packed, t, offsets, 4, 4)),
        "kvcache k_cache": ("k_cache", cache, lambda t: kernels.attention_with_kvcache(q_seq, t, cache)),
        "kvcache cache_seqlens": ("cache_seqlens", seqlens,
                                  lambda t: kernels.attention_with_kvcache(q_seq, cache, cache, cache_seqlens=t)),
        "flash_attn_func k": ("k", q_seq, lambda t: flash_attn.flash_attn_func(q_seq, t, q_seq)),
        "softmax x": ("x", x(3, 5), lambda t: kernels.softmax(t)),
        "layer_norm weight": ("weight", x(8), lambda t: kernels.layer_norm(x(3, 8), (8,), t)),
        "document_mask doc_ids": ("doc_ids", seqlens, document_mask),
        "prefix_lm_mask prefix_lengths": ("prefix_lengths", seqlens, prefix_lm_mask),
        "alibi_score slopes": ("slopes", x(H), alibi_score),
    }


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("entry, layout", [(entry, layout) for entry in _dense_calls("cpu") for layout in LAYOUTS
                                           if not (layout == "nested" and entry in ONE_DIM)])
def test_sparse_and_nested_tensors_are_refused_by_name(entry, layout, device):
    """A sparse or nested tensor anywhere a dense one goes is a TypeError naming the argument; it reached torch's
    internals (``.shape`` of a nested tensor, ``.contiguous()`` of a sparse one) or the interpreter's storage
    read ("Cannot access storage of SparseTensorImpl") before."""
    name, valid, call = _dense_calls(device)[entry]
    to_layout, shown = LAYOUTS[layout]
    with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got a {shown} tensor"):
        call(to_layout(valid))


@pytest.mark.parametrize("cap, error", [(math.inf, ValueError), (0.0, ValueError), (-1.0, ValueError),
                                        ("1", TypeError), (None, TypeError), (True, TypeError)])
def test_softcap_score_takes_a_finite_positive_cap(cap, error):
    """An infinite cap computed inf * tanh(0) = NaN scores silently; strings and None were a TypeError from '>'
    that named nothing."""
    with pytest.raises(error, match="^cap must"):
        softcap_score(cap)


@pytest.mark.parametrize("cap", [2, np.float32(2.0)])
def test_softcap_score_keeps_an_int_or_numpy_cap(cap, device):
    """The check takes what a real number is, as the built-in ``softcap`` does."""
    q = torch.randn(B, H, N, D, device=device)
    torch.testing.assert_close(kernels.attention(q, q, q, score_mod=softcap_score(cap)),
                               kernels.attention(q, q, q, softcap=2.0))


@pytest.mark.parametrize("shift", [1.5, "1", math.inf, math.nan, None, True])
def test_alibi_score_shift_must_be_an_int(shift, device):
    """int() truncated 1.5, parsed "1" and raised OverflowError/an unnamed ValueError for inf/NaN."""
    with pytest.raises(TypeError, match="^shift must be an int"):
        alibi_score(torch.ones(H, device=device), shift=shift)


@triton.jit
def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_mask_mod_index_dims_must_be_a_dict():
    """A string raised AttributeError ('str' object has no attribute 'items')."""
    with pytest.raises(TypeError, match="index_dims must be a dict"):
        MaskMod(_causal, index_dims="b")


@pytest.mark.parametrize("bad, error", [("bogus", ValueError), (3.5, TypeError)])
def test_create_block_mask_names_a_malformed_device(bad, error):
    """torch.device's own errors (a RuntimeError for an unknown string) named neither the function nor device."""
    with pytest.raises(error, match="^create_block_mask: device must be"):
        create_block_mask(_causal, B, H, N, N, device=bad)


def test_the_checks_still_pass_plain_tensors(device):
    """The dense checks sit on the common paths' fast checks too: plain tensors (and non-contiguous ones) pass."""
    q = torch.randn(B, N, H, D, device=device).transpose(1, 2)
    assert kernels.attention(q, q, q).shape == (B, H, N, D)
    doc = torch.zeros(N, dtype=torch.int32, device=device)
    assert kernels.attention(q, q, q, mask_mod=document_mask(doc)).shape == (B, H, N, D)


@pytest.mark.parametrize("causal", ["False", None, 1.0, torch.tensor([True, False])])
@pytest.mark.parametrize("entry", ["attention", "attention_varlen", "attention_with_kvcache"])
def test_causal_must_be_a_bool(entry, causal, device):
    """bool(causal) took the string "False" (and 1.0) as causal and None as not, silently, and a 2-element tensor
    was torch's RuntimeError; torch's SDPA and flash-attn refuse them all (ints stay: these functions took them)."""
    x = torch.randn(6, H, D, device=device)
    offsets = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    calls = {"attention": lambda: kernels.attention(x[None], x[None], x[None], causal=causal),
             "attention_varlen": lambda: kernels.attention_varlen(x, x, x, offsets, offsets, 4, 4, causal=causal),
             "attention_with_kvcache": lambda: kernels.attention_with_kvcache(x[None], x[None], x[None],
                                                                              causal=causal)}
    with pytest.raises(TypeError, match="^causal must be a bool"):
        calls[entry]()


@pytest.mark.parametrize("causal", [np.bool_(True), 1, np.int64(1)])
def test_causal_takes_a_numpy_bool_or_an_int(causal, device):
    q = torch.randn(B, H, N, D, device=device)
    torch.testing.assert_close(kernels.attention(q, q, q, causal=causal), kernels.attention(q, q, q, causal=True))


@pytest.mark.parametrize("sizes, error", [((1, 2, "4", 4), TypeError), ((1, 2, 2.5, 4), TypeError),
                                          ((1, True, 4, 4), TypeError), ((-1, 2, 4, 4), ValueError)])
def test_create_block_mask_sizes_type_then_range(sizes, error):
    """A size of the wrong type was a ValueError like a negative one; TypeError now, as for every other argument."""
    with pytest.raises(error, match="^create_block_mask: (B|H|Nq|Nk) must be a non-negative int"):
        create_block_mask(_causal, *sizes)


def test_zero_kv_heads_are_named_as_such(device):
    """With q's heads 0 too, "must divide q's 0 heads" alone read as if 0 kv heads should pass (0 divides 0)."""
    x = torch.randn(B, 0, N, D, device=device)
    with pytest.raises(ValueError, match="kv heads must divide q's 0 heads and be at least 1"):
        kernels.attention(x, x, x)


@pytest.mark.parametrize("device,error", [("meta", ValueError), ("nope", ValueError), (3.5, TypeError)])
def test_attention_dropout_mask_device_is_checked_like_create_block_masks(device, error):
    """meta gave torch's "Cannot copy out of meta tensor" from inside the launch, a bad string torch's parse error:
    neither named attention_dropout_mask's device."""
    with pytest.raises(error, match="attention_dropout_mask: device must be"):
        kernels.attention_dropout_mask(1, 2, 3, 4, 0.5, device=device)


@pytest.mark.parametrize("sizes, error", [((1, 2, "4", 4), TypeError), ((1, 2.0, 4, 4), TypeError),
                                          ((True, 2, 4, 4), TypeError), ((1, 2, 4, -3), ValueError)])
def test_attention_dropout_mask_sizes_type_then_range_as_create_block_mask(sizes, error):
    """Its sizes were a ValueError for any bad value and named no function; create_block_mask's (and torch's)
    rule now: TypeError for a non-int, ValueError for a negative one."""
    with pytest.raises(error, match="^attention_dropout_mask: (batch|heads|n_q|n_k) must be a non-negative int"):
        kernels.attention_dropout_mask(*sizes, 0.5)
