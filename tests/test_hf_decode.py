"""Hugging Face generation on the decode kernel: with a static cache, each decoding step runs
``kernels.attention_with_kvcache`` on the preallocated cache in place (cache_seqlens growing, left padding as
cache_leftpad) and gives eager's tokens and logits; what it cannot express, and calls that need grad, keep the
dense kernel."""
import pytest
import torch
import torch.nn as nn

import kernels
from test_hf import tiny_llama, tiny_qwen2
from transformer import hf, patch

transformers = pytest.importorskip("transformers")

PROMPT, NEW = 10, 4  # PROMPT > hf.DECODE_MAX_QUERIES: the prefill runs the dense kernel


@pytest.fixture
def attention_calls(monkeypatch):
    """Records (kernel, q or k_cache shapes, cache_seqlens, cache_leftpad) of every attention kernel call."""
    calls = []
    attention, with_kvcache = kernels.attention, kernels.attention_with_kvcache

    def dense(q, k, v, *args, **kwargs):
        calls.append(("attention", tuple(q.shape), tuple(k.shape)))
        return attention(q, k, v, *args, **kwargs)

    def decode(q, k_cache, v_cache, **kwargs):
        leftpad = kwargs["cache_leftpad"]
        calls.append(("with_kvcache", tuple(q.shape), tuple(k_cache.shape), kwargs["cache_seqlens"],
                      None if leftpad is None else leftpad.tolist()))
        return with_kvcache(q, k_cache, v_cache, **kwargs)

    monkeypatch.setattr(kernels, "attention", dense)
    monkeypatch.setattr(kernels, "attention_with_kvcache", decode)
    return calls


def _generate(model, ids, mask, **compile_options):
    """Greedy static-cache generation: not compiled, or with ``compile_options`` compiled as generate() does on a
    GPU (CompileConfig forced on CPU)."""
    if compile_options:
        config = transformers.CompileConfig(**compile_options)
        config._compile_all_devices = True
        compile_options = dict(compile_config=config)
    else:
        compile_options = dict(disable_compile=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, cache_implementation="static",
                         output_logits=True, return_dict_in_generate=True, **compile_options)
    return out.sequences, torch.stack(out.logits)


def _left_padded_prompts(device):
    """Two prompts of PROMPT tokens, the first with 3 slots of left padding: (ids, 2-D mask)."""
    ids = torch.randint(1, 50, (2, PROMPT), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_decoding_steps_run_the_decode_kernel_on_the_cache(build, padded, device, hf_kernel_only,
                                                                        attention_calls):
    """Qwen2's second layer is full attention (a static cache of PROMPT + NEW - 1 slots), its first a sliding
    window of 3 (a 3-slot rolling cache): the full layer's steps see cache_seqlens PROMPT + 1, + 2, + 3 and row 0's
    3 padding slots as cache_leftpad; no step runs the dense kernel."""
    model = build().to(device)
    ids = torch.randint(1, 50, (2, PROMPT), device=device)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    with torch.no_grad():
        expected, expected_logits = _generate(model, ids, mask)
        got, logits = _generate(patch(model), ids, mask)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)

    layers, slots = model.config.num_hidden_layers, PROMPT + NEW - 1
    dense = [c for c in attention_calls if c[0] == "attention"]
    assert [c[1][2] for c in dense] == [PROMPT] * layers  # the prefill only
    steps = [c for c in attention_calls if c[0] == "with_kvcache"]
    assert len(steps) == layers * (NEW - 1)
    assert all(c[1][1] == 1 for c in steps)  # (B, Sq = 1, H, D)
    full_layers = 1 if build is tiny_qwen2 else layers
    full = [c for c in steps if c[2][1] == slots]  # the whole preallocated cache, (B, S_max, Hkv, D)
    assert [c[3] for c in full] == [PROMPT + i for i in range(1, NEW) for _ in range(full_layers)]
    assert all(c[4] == ([3, 0] if padded else None) for c in full)
    if build is tiny_qwen2:
        window = [c for c in steps if c[2][1] == 3]
        assert len(window) == NEW - 1 and all(c[3] == 3 for c in window)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_a_model_loaded_on_the_registered_kernel_decodes_a_static_cache_on_it(build, device, tmp_path, hf_kernel_only,
                                                                              attention_calls):
    """from_pretrained(attn_implementation="fused_triton") after register_hf_attention(), no patch(): generate()
    builds a static cache's masks ahead with transformers' create_masks_for_generate, whose KernelMask the forward
    rejected (AttributeError: 'KernelMask' object has no attribute 'ndim'). Now eager's tokens and logits, every
    step on the decode kernel, Qwen2's dict of two masks (sliding and full) included."""
    model = build().to(device)
    ids, mask = _left_padded_prompts(device)
    with torch.no_grad():
        expected, expected_logits = _generate(model, ids, mask)
    model.save_pretrained(tmp_path)
    hf.register_hf_attention()
    loaded = type(model).from_pretrained(tmp_path, attn_implementation=hf.ATTENTION_NAME).to(device).eval()
    with torch.no_grad():
        got, logits = _generate(loaded, ids, mask)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    steps = [c for c in attention_calls if c[0] == "with_kvcache"]
    assert len(steps) == model.config.num_hidden_layers * (NEW - 1)
    assert [c[1][2] for c in attention_calls if c[0] == "attention"] == [PROMPT] * model.config.num_hidden_layers


def test_padding_the_decode_kernel_cannot_express_keeps_the_dense_kernel(device, hf_kernel_only, attention_calls):
    """A hole in the 2-D mask (not left padding): every step runs kernels.attention with the key mask, eager's
    tokens."""
    model = tiny_llama().to(device)
    ids = torch.randint(1, 50, (2, PROMPT), device=device)
    mask = torch.ones_like(ids)
    mask[0, 4] = 0
    with torch.no_grad():
        expected, expected_logits = _generate(model, ids, mask)
        got, logits = _generate(patch(model), ids, mask)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert attention_calls and all(c[0] == "attention" for c in attention_calls)
    assert [c[1][2] for c in attention_calls].count(1) == model.config.num_hidden_layers * (NEW - 1)


def test_a_decoding_step_that_needs_grad_runs_the_differentiable_kernel(device, attention_calls):
    """One query against a longer cache: without grad the decode kernel, with a query that requires grad the
    dense kernel (the decode kernel has no backward), same output, and the gradient flows."""
    module = nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 1, 8, device=device)
    k, v = torch.randn(2, 2, 7, 8, device=device), torch.randn(2, 2, 7, 8, device=device)
    expected = kernels.reference.attention(q, k, v, causal=True, scale=0.3).transpose(1, 2)
    with torch.no_grad():
        out, _ = hf.hf_attention(module, q, k, v, None, scaling=0.3)
    assert [c[0] for c in attention_calls] == ["with_kvcache"]
    torch.testing.assert_close(out, expected)
    q.requires_grad_()
    out, _ = hf.hf_attention(module, q, k, v, None, scaling=0.3)
    assert [c[0] for c in attention_calls] == ["with_kvcache", "attention"]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("build,backend", [(tiny_llama, "inductor"), (tiny_llama, "aot_eager"),
                                           (tiny_qwen2, "aot_eager")])
def test_compiled_static_cache_steps_run_the_decode_kernel(build, backend, device, hf_kernel_only, monkeypatch):
    """generate() compiling the static cache's decoding steps (transformers' default on a GPU: inductor,
    mode="reduce-overhead", here fullgraph): every step's layers launch the decode kernel (counted where the
    eager path and the custom op both call it) with the lengths and left padding read off the traced mask on the
    device, eager's tokens and logits. With aot_eager (a counting backend that survives CompileConfig.to_dict's
    deepcopy) Llama compiles one graph for all steps; Qwen2 one more, for transformers' own guard on its sliding
    window cache's fill (cache_utils' cumulative_length_int), which nothing here reads."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from kernels.attention import decode

    model = build().to(device)
    ids, mask = _left_padded_prompts(device)
    with torch.no_grad():
        expected, expected_logits = _generate(model, ids, mask)
        patch(model)
        launches, attend = [], decode._attend
        monkeypatch.setattr(decode, "_attend", lambda q, *args: launches.append(tuple(q.shape)) or attend(q, *args))
        counter = type("Counter", (CompileCounterWithBackend,), {"__deepcopy__": lambda self, memo: self})(backend)
        options = dict(mode="reduce-overhead") if backend == "inductor" else dict(backend=counter, mode=None)
        got, logits = _generate(model, ids, mask, fullgraph=True, **options)
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    config = model.config
    query = (2, 1, config.num_attention_heads, config.hidden_size // config.num_attention_heads)
    assert launches == [query] * (config.num_hidden_layers * (NEW - 1))
    assert backend == "inductor" or counter.frame_count == (1 if build is tiny_llama else 2)


def test_traced_masks_find_each_rows_key_range_on_the_device():
    """_key_ranges: one past the last key any query of a row sees and the first (left padding, a window's start),
    [0, 0) for a row that sees none, from a (B or 1, 1, Q, K) mask."""
    keys = torch.arange(8)
    rows = [(keys >= 2) & (keys < 6), (keys >= 0) & (keys < 8), torch.zeros(8, dtype=torch.bool)]
    mask = torch.stack(rows)[:, None, None].expand(3, 1, 2, 8).clone()
    mask[0, 0, 0, 5] = False  # the first query sees one key fewer (causal): the last query's end counts
    seqlens, leftpad = hf._key_ranges(mask, 3)
    assert seqlens.tolist() == [6, 8, 0] and leftpad.tolist() == [2, 0, 0]
    assert seqlens.dtype == leftpad.dtype == torch.int32
    assert [t.tolist() for t in hf._key_ranges(mask[1:2], 2)] == [[8, 8], [0, 0]]
