"""flash-attn drop-in details: bool flags that refuse strings (kernels.attention, attention_varlen,
attention_with_kvcache and flash-attn's functions), max_seqlen bounds, and errors that name the argument the user
passed (a packed qkv or kv, a paged k of the wrong rank). Outputs are checked against float64 math
(tests/tolerance.py)."""
import re

import pytest
import torch

import kernels
from kernels import flash_attn, reference
from kernels.attention import checks, configs
from kernels.attention.decode import attention_with_kvcache
from kernels.attention.varlen import attention_varlen
from tolerance import assert_close


def _cu(lengths, device):
    """int32 cumulative offsets (batch + 1,) of ``lengths``."""
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def _forbid_launches(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel launched before the bad input was rejected")

    monkeypatch.setattr(configs, "launch", forbidden)


# ------------------------------------------------------------------------------------------------ bool flags


def _cache(device):
    """(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin) of a 2-row decode step appending one key at 3."""
    q, k, v = (torch.randn(2, 1, 3, 24, device=device) for _ in range(3))
    k_cache, v_cache = (torch.randn(2, 7, 3, 24, device=device) for _ in range(2))
    angles = torch.rand(7, 6, device=device)
    return q, k_cache, v_cache, k, v, angles.cos(), angles.sin()


@pytest.mark.parametrize("flag", ["rotary_interleaved", "return_lse"])
def test_kvcache_flags_refuse_a_string_before_writing_the_cache(device, flag):
    q, k_cache, v_cache, k, v, cos, sin = _cache(device)
    before = k_cache.clone()
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        attention_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=3,
                               **{flag: "False"})
    assert torch.equal(k_cache, before)


def test_attention_and_varlen_return_lse_refuse_a_string(monkeypatch, device):
    _forbid_launches(monkeypatch)
    q = torch.randn(2, 3, 5, 24, device=device)
    packed = torch.randn(9, 3, 24, device=device)
    cu = _cu([4, 5], device)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        kernels.attention(q, q, q, return_lse="False")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        attention_varlen(packed, packed, packed, cu, cu, 5, 5, return_lse="False")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        attention_varlen(packed, packed, packed, cu, cu, 5, 5, return_lse=None)


def test_int_flags_are_taken_as_bools(device):
    """check_flag's rule: ints (0 false, else true) and numpy bools are flags; the result is the bool's."""
    q, k_cache, v_cache, k, v, cos, sin = _cache(device)
    cache = k_cache.clone(), v_cache.clone()
    out, lse = attention_with_kvcache(q, *cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=3,
                                      rotary_interleaved=0, return_lse=1)
    expected, expected_lse = attention_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                                    cache_seqlens=3, rotary_interleaved=False, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    x = torch.randn(1, 3, 6, 24, device=device)
    assert isinstance(kernels.attention(x, x, x, return_lse=0), torch.Tensor)
    assert len(kernels.attention(x, x, x, return_lse=1)) == 2


# ------------------------------------------------------------------------------------------------ max_seqlen


@pytest.mark.parametrize("max_seqlen", [2**31, 2**40, -1])
@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_out_of_int32_is_a_value_error_naming_it(monkeypatch, device, name, max_seqlen):
    _forbid_launches(monkeypatch)
    packed = torch.randn(9, 3, 24, device=device)
    cu = _cu([4, 5], device)
    lengths = {"max_seqlen_q": 5, "max_seqlen_k": 5, name: max_seqlen}
    with pytest.raises(ValueError, match=name):
        flash_attn.flash_attn_varlen_func(packed, packed, packed, cu, cu, **lengths)


def test_a_generous_max_seqlen_gives_the_exact_ones_result(device):
    """max_seqlen is only a bound: one far above the longest sequence (up to int32's) computes the same rows,
    without a grid of programs sized by it."""
    lengths_q, lengths_k = [5, 11, 3], [7, 2, 13]
    q = torch.randn(sum(lengths_q), 3, 40, device=device)
    k, v = (torch.randn(sum(lengths_k), 3, 40, device=device) for _ in range(2))
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2**31 - 1, 10**8, causal=True)
    exact = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 13, causal=True)
    assert torch.equal(out, exact)
    dropped = []
    for max_seqlens in ((2**31 - 1, 10**8), (11, 13)):  # the same keep-mask: drawn per element, not per grid
        torch.manual_seed(1)
        dropped.append(flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, *max_seqlens, dropout_p=0.3))
    assert torch.equal(*dropped)
    starts_q, starts_k = [0, 5, 16], [0, 7, 9]
    for b in range(3):  # each sequence against float64 (bottom-right causal per sequence)
        rows = slice(starts_q[b], starts_q[b] + lengths_q[b])
        keys = slice(starts_k[b], starts_k[b] + lengths_k[b])
        views = [t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys])]
        ref64 = reference.attention(*(t.double() for t in views), causal=True)
        ref = reference.attention(*views, causal=True)
        assert_close(out[rows].transpose(0, 1)[None], ref64, ref)


# ------------------------------------------------------------------------------------------- named arguments


def test_paged_varlen_with_a_3d_k_says_block_table_needs_a_page_pool(monkeypatch, device):
    _forbid_launches(monkeypatch)
    packed = torch.randn(9, 3, 24, device=device)
    cu = _cu([4, 5], device)
    table = torch.zeros(2, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"k must be 4-D with block_table: a page pool \(num_blocks, page_size"):
        flash_attn.flash_attn_varlen_func(packed, packed, packed, cu, cu, 5, 5, block_table=table)
    pool = torch.randn(2, 4, 3, 24, device=device)
    with pytest.raises(ValueError, match=r"k must be 3-D without block_table"):
        flash_attn.flash_attn_varlen_func(packed, pool, pool, cu, cu, 5, 5)


def _packed_calls(device):
    """(call, error, the argument its message must name) for bad packed inputs."""
    q = torch.randn(2, 5, 6, 24, device=device)
    packed_q = torch.randn(9, 6, 24, device=device)
    cu = _cu([4, 5], device)
    dense_kv = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=device, dtype=dtype)
    return [
        (lambda: flash_attn.flash_attn_qkvpacked_func(dense_kv(2, 5, 3, 3, 300)), ValueError, "qkv"),
        (lambda: flash_attn.flash_attn_qkvpacked_func(dense_kv(2, 5, 3, 0, 24)), ValueError, "qkv"),
        (lambda: flash_attn.flash_attn_varlen_qkvpacked_func(dense_kv(9, 3, 3, 300), cu, 5), ValueError, "qkv"),
        (lambda: flash_attn.flash_attn_kvpacked_func(q, dense_kv(2, 5, 2, 3, 40)), ValueError, "kv"),
        (lambda: flash_attn.flash_attn_kvpacked_func(q, dense_kv(2, 5, 2, 4, 24)), ValueError, "kv"),
        (lambda: flash_attn.flash_attn_kvpacked_func(q, dense_kv(3, 5, 2, 3, 24)), ValueError, "kv"),
        (lambda: flash_attn.flash_attn_kvpacked_func(q, dense_kv(2, 5, 2, 3, 24, dtype=torch.float16)), TypeError,
         "kv"),
        (lambda: flash_attn.flash_attn_varlen_kvpacked_func(packed_q, dense_kv(9, 2, 3, 40), cu, cu, 5, 5),
         ValueError, "kv"),
        (lambda: flash_attn.flash_attn_varlen_kvpacked_func(packed_q, dense_kv(9, 2, 4, 24), cu, cu, 5, 5),
         ValueError, "kv"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_packed_functions_name_the_packed_argument(monkeypatch, device, case):
    _forbid_launches(monkeypatch)
    call, error, name = _packed_calls(device)[case]
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert re.search(rf"(^|\W){name}(\W|$)", message), message
    assert "k, v" not in message and "k and v" not in message and not message.startswith("q:"), message


def _packed_messages(device):
    """(call, its exact message): the packed functions' errors come from check_qkv, named for the packed argument
    and showing its shape and flash-attn's layouts."""
    q = torch.randn(2, 5, 6, 24, device=device)
    packed_q = torch.randn(9, 6, 24, device=device)
    cu = _cu([4, 5], device)
    return [
        (lambda: flash_attn.flash_attn_kvpacked_func(q, torch.randn(2, 5, 2, 3, 40, device=device)),
         "kv must have head dim 24 like q (batch_size, seqlen_q, nheads, headdim), got kv of shape (2, 5, 2, 3, 40)"),
        (lambda: flash_attn.flash_attn_kvpacked_func(q, torch.randn(3, 5, 2, 3, 24, device=device)),
         "kv must have batch size 2 like q (batch_size, seqlen_q, nheads, headdim), got kv of shape (3, 5, 2, 3, 24)"),
        (lambda: flash_attn.flash_attn_varlen_kvpacked_func(packed_q, torch.randn(9, 2, 4, 24, device=device), cu, cu,
                                                            5, 5),
         "kv: the number of kv heads must divide q's 6 heads and be at least 1, got kv of shape (9, 2, 4, 24)"),
        (lambda: flash_attn.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 3, 300, device=device)),
         "qkv: head dim must be in 1..256, got qkv of shape (2, 5, 3, 3, 300)"),
        (lambda: flash_attn.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8, device=device)),
         "qkv must be (batch_size, seqlen, 3, nheads, headdim), got shape (1, 4, 2, 2, 8)"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_packed_errors_show_the_packed_shape_and_flash_layouts(monkeypatch, device, case):
    _forbid_launches(monkeypatch)
    call, message = _packed_messages(device)[case]
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value) == message


def test_check_qkv_names_its_arguments_as_told(device):
    """check_qkv's ``names``: two distinct names for k and v are listed together, as its defaults are."""
    q, v = torch.randn(1, 4, 3, 8, device=device), torch.randn(1, 3, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"^key, value: the number of kv heads must divide query's 4 heads and be at "
                                         r"least 1, got key of shape \(1, 3, 5, 8\)$"):
        checks.check_qkv(q, v.clone(), v, names=("query", "key", "value"))
    with pytest.raises(TypeError, match=r"^query, key, value must share one dtype"):
        checks.check_qkv(q, v.half(), v, names=("query", "key", "value"))
