"""Regressions found by code review: layouts a kernel assumed without checking, overflow at the edges, arguments."""
import pytest
import torch

import kernels


def test_backward_takes_a_saved_lse_handed_back_as_a_padded_view():
    """A saved-tensors hook may unpack lse as a view with unit last stride that is not dense (``buf[..., :N]``):
    delta is written densely and read with lse's strides, so the backward must make lse contiguous first."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 2, 8, 16)

    def unpack(x):
        if x.dtype == torch.float32 and x.dim() == 3:  # lse (B, H, N): padded rows, the padding poisoned
            buf = torch.full((*x.shape[:-1], x.shape[-1] + 5), 7.0)
            buf[..., :x.shape[-1]] = x
            return buf[..., :x.shape[-1]]
        return x

    expected = torch.autograd.grad((kernels.attention(q, k, v, causal=True) * g).sum(), (q, k, v))
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, unpack):
        out = kernels.attention(q, k, v, causal=True)
    for got, want in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rotary_tables_with_different_strides_rotate_as_contiguous_ones():
    """rotary_sin laid out unlike rotary_cos (transposed, or a slice of a larger buffer whose other rows are NaN)
    rotates q and the new keys exactly as contiguous tables do, and reads nothing outside rotary_sin."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 1, 16)
    v = torch.randn_like(k)
    angles = torch.rand(8, 4) * 6
    seqlens = torch.tensor([5], dtype=torch.int32)

    def run(cos, sin):
        k_cache, v_cache = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16)
        out = kernels.attention_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                             cache_seqlens=seqlens, causal=True)
        return out, k_cache

    want_out, want_cache = run(angles.cos(), angles.sin())
    transposed = angles.sin().t().contiguous().t()  # strides (1, 8)
    poisoned = torch.full((16, 4), float("nan"))
    poisoned[:8] = angles.sin()
    wide_cos = torch.cat([angles.cos(), torch.zeros(8, 4)], 1)[:, :4]  # strides (8, 1)
    for cos, sin in ((angles.cos(), transposed), (wide_cos, poisoned[:8])):
        out, cache = run(cos, sin)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)


def test_shape_only_attention_lays_out_its_output_as_a_real_call():
    """On meta tensors or under an eager FakeTensorMode the reference's ops run (nothing can launch): the output
    still has the strides a real call's has (q's, where q is dense, such as flash-attn's transposed layout)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def qkv(device):
        q = torch.randn(1, 6, 2, 8, device=device).transpose(1, 2)  # (B, H, N, D) with (B, N, H, D) strides
        kv = torch.randn(1, 6, 1, 8, device=device).transpose(1, 2)
        return q, kv, kv

    real = kernels.attention(*qkv("cpu"), causal=True)
    assert real.stride() == (96, 8, 16, 1)
    assert kernels.attention(*qkv("meta"), causal=True).stride() == real.stride()
    with FakeTensorMode():
        assert kernels.attention(*qkv("cpu"), causal=True).stride() == real.stride()


def test_an_eps_that_overflows_the_statistics_dtype_gives_torchs_zero_gradients():
    """eps finite in float64 but inf in fp32 (1e39; or in fp16 past 65504 under casting mode "none") made rstd 0,
    which the kernels' backward reads as an overflowed row: NaN dx where torch's rms_norm gives 0."""
    for dtype, eps, mode in ((torch.float32, 1e39, "llama"), (torch.float16, 7e4, "none")):
        x = torch.randn(2, 8, dtype=dtype, requires_grad=True)
        y = kernels.rms_norm(x, 8, None, eps, casting_mode=mode)
        y.float().sum().backward()
        assert (y == 0).all() and (x.grad == 0).all(), (dtype, x.grad)


@pytest.mark.parametrize("function", [kernels.add_layer_norm, kernels.add_rms_norm])
def test_add_norms_refuse_a_missing_residual(function):
    """residual=None returned y alone, which `y, h = ...` silently unpacked row by row."""
    with pytest.raises(TypeError, match=f"{function.__name__}: residual must be a tensor"):
        function(torch.randn(2, 8), None, 8)
