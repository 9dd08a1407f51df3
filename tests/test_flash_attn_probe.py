"""Regressions found by probing kernels.flash_attn and kernels.attention.varlen as a flash-attn 2.x user would."""
import pytest
import torch

from kernels import flash_attn


DENSE_SHAPE_ERRORS = [  # (q, k, v shapes as passed: (B, S, H, D)), the message flash_attn_func must give
    ((1, 5, 2, 24), (1, 5, 2, 16), (1, 5, 2, 16),
     "k, v must have head dim 24 like q (batch_size, seqlen_q, nheads, headdim), got k of shape (1, 5, 2, 16)"),
    ((1, 5, 2, 24), (2, 5, 2, 24), (2, 5, 2, 24),
     "k, v must have batch size 1 like q (batch_size, seqlen_q, nheads, headdim), got k of shape (2, 5, 2, 24)"),
    ((1, 5, 2, 24), (1, 5, 2, 24), (1, 6, 2, 24),
     "k and v must have the same shape (batch_size, seqlen_k, nheads_k, headdim), got (1, 5, 2, 24) and "
     "(1, 6, 2, 24)"),
    ((1, 5, 3, 24), (1, 7, 2, 24), (1, 7, 2, 24),
     "k, v: the number of kv heads must divide q's 3 heads and be at least 1, got k of shape (1, 7, 2, 24)"),
    ((1, 3, 2, 257), (1, 3, 2, 257), (1, 3, 2, 257), "q: head dim must be in 1..256, got q of shape (1, 3, 2, 257)"),
]


@pytest.mark.parametrize("q_shape,k_shape,v_shape,message", DENSE_SHAPE_ERRORS)
def test_flash_attn_func_shape_errors_show_the_shapes_passed_in_flash_attns_layout(device, q_shape, k_shape,
                                                                                   v_shape, message):
    """The checks run on (B, H, S, D) views; their messages showed the views' shapes and layouts ("got k of
    shape (1, 2, 5, 16)", "(B, H, Nq, D)") where the caller passed (B, S, H, D) tensors."""
    q, k, v = (torch.randn(shape, device=device) for shape in (q_shape, k_shape, v_shape))
    with pytest.raises(ValueError) as raised:
        flash_attn.flash_attn_func(q, k, v, causal=True)
    assert str(raised.value) == message
    assert raised.value.__suppress_context__  # not shown after the views' message


def test_flash_attn_func_other_errors_keep_their_message(device):
    q = torch.randn(1, 5, 2, 24, device=device)
    with pytest.raises(ValueError, match=r"^window_size values must be >= -1"):
        flash_attn.flash_attn_func(q, q, q, window_size=(-5, 0))


def _cu(lengths, device):
    """int32 cumulative offsets (batch + 1,) of ``lengths``."""
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _kept_probs_out(s_dmask, v, dropout_p):
    """The output flash-attn's S_dmask stands for: its kept (positive) probabilities, rescaled, times v, for
    (..., H, Nq, Nk) S_dmask and (..., Nk, H, D) v."""
    return torch.einsum("...hij,...jhd->...ihd", s_dmask.clamp(min=0) / (1 - dropout_p), v)


@pytest.mark.parametrize("varlen", [False, True])
def test_s_dmask_under_torch_compile_is_the_mask_the_call_used(device, fresh_dynamo, varlen):
    """Compiled, the attention call drew its dropout from inductor's random stream while S_dmask replayed the
    generator's state (on CPU tracing the interpreted mask launch crashed): S_dmask must describe out's mask."""
    q, k, v = (torch.randn(2, 5, 2, 24, device=device) for _ in range(3))
    cu = _cu([5, 5], device)
    if varlen:
        def call(q, k, v):
            out, _, s_dmask = flash_attn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu,
                                                                cu, 5, 5, dropout_p=0.4, return_attn_probs=True)
            return out.unflatten(0, (2, 5)), s_dmask
    else:
        def call(q, k, v):
            out, _, s_dmask = flash_attn.flash_attn_func(q, k, v, dropout_p=0.4, causal=True, return_attn_probs=True)
            return out, s_dmask
    out, s_dmask = torch.compile(call)(q, k, v)
    torch.testing.assert_close(out, _kept_probs_out(s_dmask, v, 0.4))
