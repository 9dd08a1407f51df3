"""Regressions found by probing attention's entry points (kernels.attention, attention_varlen, flash-attn's
functions, attention_with_kvcache) as a torch.distributed and flash-attn user: DTensor arguments, and the memos that
kept a caller's tensors (and the memory they view) alive."""
import gc
import re
import weakref

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

import kernels
from kernels import flash_attn
from kernels.attention.checks import plain_qkv_shapes


@pytest.fixture
def launches(monkeypatch):
    """The interpreted Triton launches made while the test runs."""
    made, run = [], InterpretedFunction.run

    def recorded(self, *args, **kwargs):
        made.append(self.fn.__name__)
        return run(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    return made


def _cu(*lengths):
    return torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)


def _dense(**over):
    """kernels.attention's arguments (q, k, v (2, 4, 8, 16), a mask, sinks, slopes), ``over`` replacing some."""
    q = torch.randn(2, 4, 8, 16)
    args = dict(q=q, k=q.clone(), v=q.clone(), key_padding_mask=torch.ones(2, 8, dtype=torch.bool),
                sinks=torch.zeros(4), alibi_slopes=torch.ones(4))
    return {**args, **over}


def _packed(**over):
    """attention_varlen's arguments (sequences of 3 and 5 tokens, 2 heads of 8; paged keys with block_table)."""
    q = torch.randn(8, 2, 8)
    args = dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens_q=_cu(3, 5), cu_seqlens_k=_cu(3, 5), max_seqlen_q=5,
                max_seqlen_k=5)
    return {**args, **over}


def _paged(**over):
    pool = torch.randn(4, 4, 2, 8)
    return _packed(k=pool, v=pool.clone(), block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), **over)


def _decode(**over):
    """attention_with_kvcache's arguments: 2 rows, one new key each, every optional index and table given."""
    cache = torch.zeros(2, 16, 2, 8)
    args = dict(q=torch.randn(2, 1, 4, 8), k_cache=cache, v_cache=cache.clone(), k=torch.randn(2, 1, 2, 8),
                v=torch.randn(2, 1, 2, 8), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32),
                cache_leftpad=torch.tensor([0, 1], dtype=torch.int32), rotary_cos=torch.ones(16, 4),
                rotary_sin=torch.zeros(16, 4), alibi_slopes=torch.ones(4))
    return {**args, **over}


def _paged_decode(**over):
    pool = torch.zeros(4, 8, 2, 8)
    args = _decode(k_cache=pool, v_cache=pool.clone(), block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    del args["cache_batch_idx"]
    return {**args, **over}


def _call(fn, args: dict):
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return fn(q, k, v, **args)


def _flash_varlen(args: dict):
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    positional = [args.pop(name) for name in names]
    return flash_attn.flash_attn_varlen_func(*positional, **args)


def _flash_decode(args: dict):
    q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    return flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, **args)


ENTRY_POINTS = {  # (the call of its arguments, the arguments, those that are tensors)
    "attention": (lambda a: _call(kernels.attention, a), _dense,
                  ("q", "k", "v", "key_padding_mask", "sinks", "alibi_slopes")),
    "attention float64": (lambda a: _call(kernels.attention, a),
                          lambda **o: _dense(**{n: torch.randn(2, 4, 8, 16, dtype=torch.float64)
                                                for n in "qkv"}, **o), ("q", "v")),
    "attention_varlen": (lambda a: _call(kernels.attention_varlen, a), _packed,
                         ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")),
    "attention_varlen variants": (lambda a: _call(kernels.attention_varlen, a),
                                  lambda **o: _packed(sinks=torch.zeros(2), alibi_slopes=torch.ones(2, 2), **o),
                                  ("sinks", "alibi_slopes")),
    "attention_varlen paged": (lambda a: _call(kernels.attention_varlen, a), _paged, ("k", "block_table")),
    "flash_attn_func": (lambda a: _call(flash_attn.flash_attn_func, a),
                        lambda **o: {n: torch.randn(2, 8, 4, 16) for n in "qkv"} | dict(causal=True) | o,
                        ("q", "k", "v")),
    "flash_attn_varlen_func": (_flash_varlen, _packed, ("q", "cu_seqlens_q", "cu_seqlens_k")),
    "attention_with_kvcache": (lambda a: kernels.attention_with_kvcache(**a), _decode,
                               ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "cache_batch_idx",
                                "cache_leftpad", "rotary_cos", "rotary_sin", "alibi_slopes")),
    "attention_with_kvcache paged": (lambda a: kernels.attention_with_kvcache(**a), _paged_decode,
                                     ("k_cache", "block_table")),
    "flash_attn_with_kvcache": (_flash_decode, _decode, ("q", "k", "cache_seqlens")),
}
CASES = [(entry, name) for entry, (_, _, names) in ENTRY_POINTS.items() for name in names]


@pytest.mark.parametrize("entry,name", CASES, ids=[f"{entry}-{name}" for entry, name in CASES])
def test_a_dtensor_argument_is_refused_by_name_before_any_launch(mesh, launches, entry, name):
    """Every DTensor q/k/v, mask, offsets, index or table crashed deep in Triton's interpreter ("Attempted to access
    the data pointer on an invalid python storage"), or in a torch op mixing it with plain tensors ("got mixed
    torch.Tensor and DTensor"); now a TypeError naming the argument and what to pass, before anything runs (the
    cache is not written)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    call, make, _ = ENTRY_POINTS[entry]
    args = make()
    placement = Shard(0) if args[name].dim() > 1 else Replicate()
    args[name] = distribute_tensor(args[name], mesh, [placement])
    cache = args.get("k_cache")
    before = None if cache is None or name == "k_cache" else cache.clone()
    message = (rf"^{name} must be a plain torch.Tensor, got a DTensor {re.escape(f'(placements ({placement!r},))')}: "
               rf"pass {name}.to_local\(\) .* or {name}.full_tensor\(\) .*ring_attention")
    with torch.no_grad(), pytest.raises(TypeError, match=message):
        call(args)
    assert launches == []
    if before is not None:
        assert torch.equal(cache, before)


PACKED = {  # flash-attn's packed functions: the packed argument named
    "qkvpacked": lambda d: flash_attn.flash_attn_qkvpacked_func(d(torch.randn(2, 8, 3, 4, 16)), causal=True),
    "kvpacked": lambda d: flash_attn.flash_attn_kvpacked_func(torch.randn(2, 8, 4, 16), d(torch.randn(2, 8, 2, 2, 16))),
    "varlen_qkvpacked": lambda d: flash_attn.flash_attn_varlen_qkvpacked_func(d(torch.randn(8, 3, 2, 8)), _cu(3, 5),
                                                                              5),
    "varlen_kvpacked": lambda d: flash_attn.flash_attn_varlen_kvpacked_func(torch.randn(8, 2, 8),
                                                                            d(torch.randn(8, 2, 2, 8)), _cu(3, 5),
                                                                            _cu(3, 5), 5, 5),
}


@pytest.mark.parametrize("function", PACKED)
def test_a_dtensor_packed_argument_is_refused_by_its_name(mesh, launches, function):
    from torch.distributed.tensor import Shard, distribute_tensor
    name = "qkv" if function.endswith("qkvpacked") else "kv"
    with pytest.raises(TypeError, match=rf"^{name} must be a plain torch.Tensor, got a DTensor"):
        PACKED[function](lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    assert launches == []


@triton.jit
def _same_document(b, h, q_idx, kv_idx, DOC):
    return tl.load(DOC + q_idx) == tl.load(DOC + kv_idx)


@triton.jit
def _head_bias(score, b, h, q_idx, kv_idx, BIAS):
    return score + tl.load(BIAS + h)


@triton.jit
def _head_bias_grad(score, b, h, q_idx, kv_idx, BIAS):
    return score * 0 + 1


@pytest.mark.parametrize("mod", ["mask_mod", "score_mod"])
def test_a_dtensor_extra_tensor_of_a_mod_is_refused_by_its_parameter(mesh, launches, mod):
    """A mod's DTensor extra tensor crashed in the interpreter as q's did (also in create_block_mask); the mod
    refuses it by its parameter when built."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    if mod == "mask_mod":
        name, extra = "_same_document's DOC", distribute_tensor(torch.zeros(8, dtype=torch.int32), mesh, [Replicate()])
        with pytest.raises(TypeError, match=f"^mask_mod {name} must be a plain torch.Tensor, got a DTensor"):
            kernels.MaskMod(_same_document, extra)
    else:
        name, extra = "_head_bias's BIAS", distribute_tensor(torch.zeros(2), mesh, [Replicate()])
        with pytest.raises(TypeError, match=f"^score_mod {name} must be a plain torch.Tensor, got a DTensor"):
            kernels.ScoreMod(_head_bias, _head_bias_grad, extra)
    assert launches == []


def test_what_the_message_says_to_pass_runs_and_sdpa_still_hands_dtensors_to_torch(mesh):
    """The local tensor of a heads-sharded DTensor (tensor parallelism) runs the kernel; the SDPA drop-in keeps
    passing DTensors to torch's own function (its placement kept)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    q = torch.randn(1, 2, 5, 8)
    heads = distribute_tensor(q, mesh, [Shard(1)])
    local = heads.to_local()
    torch.testing.assert_close(kernels.attention(local, local, local, causal=True),
                               kernels.reference.attention(q, q, q, causal=True))
    out = kernels.scaled_dot_product_attention(heads, heads, heads)
    assert isinstance(out, DTensor) and out.placements == (Shard(1),)
    torch.testing.assert_close(out.full_tensor(), torch._C._nn.scaled_dot_product_attention(q, q, q))


def test_other_tensor_subclasses_keep_the_fast_check():
    """A Parameter (or torch.compile's fake tensors) still passes the one-read check the refusal sits beside."""
    q = torch.nn.Parameter(torch.randn(1, 2, 4, 8))
    assert plain_qkv_shapes(q, q, q) == (q.shape,) * 3


def _numpy_backed(values, dtype, size: int = 1 << 16, step: int = 1):
    """(a tensor of ``values`` viewing a numpy buffer of ``size`` entries, every ``step``-th, a weak reference to
    the buffer): the buffer lives while anything holds the tensor's memory."""
    buffer = np.zeros(size, dtype=dtype)
    buffer[:len(values) * step:step] = values
    return torch.from_numpy(buffer)[:len(values) * step:step], weakref.ref(buffer)


@pytest.mark.parametrize("step", [1, 2], ids=["contiguous", "strided"])
def test_varlen_offsets_memo_keeps_no_caller_tensor_alive(launches, step):
    """The offsets memo kept the caller's contiguous cu_seqlens (``.contiguous()`` is the tensor itself), and so
    the buffer it views, until the next call with other offsets. It keeps weak references and, for strided
    offsets, its own contiguous copies: a repeat is still not checked again and gives the same result."""
    cu, buffer = _numpy_backed([0, 3, 8], np.int32, step=step)
    q = torch.randn(8, 2, 8)
    first = kernels.attention_varlen(q, q, q, cu, cu, 5, 5, causal=True)
    again = kernels.attention_varlen(q, q, q, cu, cu, 5, 5, causal=True)
    assert launches.count("_varlen_check") == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first[3:], kernels.reference.attention(*(q[None, 3:].transpose(1, 2),) * 3,
                                                                      causal=True)[0].transpose(0, 1))
    del cu
    gc.collect()
    assert buffer() is None


def test_varlen_offsets_memo_releases_a_view_of_a_large_buffer():
    """The brief's repro: offsets that are the head of a 4 MiB buffer."""
    buf = torch.zeros(1 << 20, dtype=torch.int32)
    buf[:3] = torch.tensor([0, 3, 8])
    ref = weakref.ref(buf)
    cu = buf[:3]
    q = torch.randn(8, 2, 8)
    kernels.attention_varlen(q, q, q, cu, cu, 5, 5)
    del buf, cu
    gc.collect()
    assert ref() is None


def test_varlen_offsets_memo_still_sees_an_in_place_change_of_strided_offsets():
    """The memo's copies of strided offsets stand for them only while they are unmodified."""
    cu, _ = _numpy_backed([0, 3, 8], np.int32, size=8, step=2)
    q = torch.randn(8, 2, 8)
    kernels.attention_varlen(q, q, q, cu, cu, 5, 5)
    cu[1] = 9
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        kernels.attention_varlen(q, q, q, cu, cu, 5, 5)


def test_key_padding_mask_memo_keeps_no_caller_memory_alive():
    """The padding memo kept a uint8 view of the caller's mask, so its memory, until a call with another mask; it
    keeps a copy now, and the result still hides the masked keys (zeros for a row that sees none)."""
    mask, buffer = _numpy_backed([True] * 5 + [False] * 3 + [False] * 8, np.bool_)
    mask = mask.view(2, 8)
    q = torch.randn(2, 2, 8, 8)
    out = kernels.attention(q, q, q, key_padding_mask=mask)
    torch.testing.assert_close(out[:1], kernels.reference.attention(q[:1], q[:1], q[:1], mask=mask[:1, None, None]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    del mask
    gc.collect()
    assert buffer() is None


@pytest.mark.parametrize("variant,message", [
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(H,\) = \(2,\) or \(B, H\) = \(2, 2\)"),
    (dict(sinks=torch.zeros(3)), r"sinks must have shape \(H,\) = \(2,\)")])
def test_varlen_bad_slopes_or_sinks_raise_before_the_offsets_check_launches(launches, variant, message):
    """attention_varlen checked alibi_slopes and sinks after launching its offsets' check."""
    args = _packed(**variant)
    with pytest.raises(ValueError, match=message):
        _call(kernels.attention_varlen, args)
    assert launches == []
