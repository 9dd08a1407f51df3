"""The GPT model: the triton backend computes what the reference backend computes (logits, loss, every gradient),
a sliding window means the same on every backend, the KV cache changes nothing, and weights move between
backends."""
import copy

import pytest
import torch

import kernels
from kernels import reference
from tolerance import BACKWARD, assert_close
from transformer import GPT, GPTConfig
from transformer.model import KVCache


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=50, block_size=32, n_layer=2, n_head=3, n_embd=48, backend="reference")
    fields.update(overrides)
    return GPTConfig(**fields)


def tokens(batch=2, length=19, vocab=50):
    return torch.randint(0, vocab, (batch, length))


def forward_backward(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


def with_backend(model, backend, dtype):
    return copy.deepcopy(model).to(dtype).set_backend(backend)


@pytest.mark.parametrize("dtype,n_kv_head,bias", [(torch.float32, 1, False), (torch.bfloat16, 3, True)])
def test_triton_backend_matches_reference_logits_loss_and_every_gradient(device, dtype, n_kv_head, bias):
    """Same weights: triton (in dtype) vs the float64 reference, within 2x / 3x of the reference path in dtype."""
    model = GPT(tiny_config(n_kv_head=n_kv_head, bias=bias)).to(device)
    idx, targets = tokens().to(device), tokens().to(device)
    targets[0, :3] = -1  # ignored positions
    exact = forward_backward(with_backend(model, "reference", torch.float64), idx, targets)
    torch_same = forward_backward(with_backend(model, "reference", dtype), idx, targets)
    fused = forward_backward(with_backend(model, "triton", dtype), idx, targets)
    assert_close(fused[0], exact[0], torch_same[0], name="logits")
    # The loss is a single number whose torch error may happen to be ~0: the rule's slack (two roundings of dtype
    # at the loss's magnitude) is then what bounds it.
    assert_close(fused[1], exact[1], torch_same[1], name="loss")
    assert exact[2].keys() == fused[2].keys() and len(fused[2]) == len(list(model.parameters()))
    for name, grad in fused[2].items():
        assert_close(grad, exact[2][name], torch_same[2][name], factor=BACKWARD, name=f"grad of {name}")


def test_sdpa_backend_matches_reference():
    model = GPT(tiny_config(n_kv_head=1))
    idx = tokens()
    expected, _ = model(idx)
    torch.testing.assert_close(model.set_backend("sdpa")(idx)[0], expected)


def test_window_is_the_same_function_on_every_backend_and_changes_the_logits(device):
    """window=4 in float32: triton and sdpa vs the float64 reference within the tolerance rule; positions 0..3 see
    fewer than 4 tokens, so only the later logits differ from a model without a window."""
    model = GPT(tiny_config(n_kv_head=1, window=4)).to(device)
    idx = tokens().to(device)
    exact, _ = with_backend(model, "reference", torch.float64)(idx)
    torch_same, _ = model(idx)
    for backend in ("triton", "sdpa"):
        assert_close(with_backend(model, backend, torch.float32)(idx)[0], exact, torch_same, name=backend)
    unwindowed = GPT(tiny_config(n_kv_head=1)).to(device)
    unwindowed.load_state_dict(model.state_dict())
    full, _ = unwindowed(idx)
    torch.testing.assert_close(full[:, :4], torch_same[:, :4])
    assert (full[:, 4:] - torch_same[:, 4:]).abs().amax(-1).min() > 1e-3  # every later position changes


def test_window_lets_a_token_see_itself_and_the_window_minus_one_before_it():
    maps = GPT(tiny_config(n_kv_head=1, window=3)).attention_maps(tokens(batch=1, length=9))
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    band = (j <= i) & (j > i - 3)
    for probs in maps:
        assert torch.equal(probs > 0, band.expand_as(probs))


def test_training_mode_dropout_is_the_same_function_on_every_backend(device):
    """No dropout on the attention probabilities (the kernel has none): with one RNG seed the backends agree."""
    model = GPT(tiny_config(dropout=0.2)).to(device).train()
    idx = tokens().to(device)
    outputs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(7)
        outputs[backend], _ = model.set_backend(backend)(idx)
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_state_dict_keys_do_not_depend_on_backend_and_weights_move_between_backends():
    source = GPT(tiny_config(n_kv_head=1))
    keys = {backend: list(GPT(tiny_config(n_kv_head=1, backend=backend)).state_dict()) for backend in
            ("reference", "triton", "sdpa")}
    assert keys["reference"] == keys["triton"] == keys["sdpa"]
    torch.manual_seed(1)
    target = GPT(tiny_config(n_kv_head=1, backend="sdpa"))
    idx = tokens()
    assert not torch.allclose(target(idx)[0], source(idx)[0])
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(idx)[0], source(idx)[0])


def test_output_head_is_tied_to_the_token_embedding():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight


def spy_on(monkeypatch, module, calls):
    """Record (Nq, Nk) of every ``module.attention`` call."""
    attention = module.attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", spy)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_generate_with_cache_matches_generate_without(backend, window, monkeypatch):
    """Greedy, past block_size (so the cache is rebuilt once the learned positions would shift)."""
    model = GPT(tiny_config(block_size=12, n_kv_head=1, window=window, backend=backend)).eval()
    prompt = tokens(batch=2, length=5)
    calls = []
    spy_on(monkeypatch, reference, calls)
    cached = model.generate(prompt, max_new_tokens=10, temperature=0, use_cache=True)
    if backend == "reference":  # the prompt through both layers, then one query per step against the cache
        assert calls[:4] == [(5, 5), (5, 5), (1, 6), (1, 6)]
    uncached = model.generate(prompt, max_new_tokens=10, temperature=0, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("window", [None, 3])
def test_triton_generate_with_cache_gives_the_reference_tokens_without_cache(device, monkeypatch, window):
    """The prompt through kernels.attention, then each step one query through kernels.attention_with_kvcache
    against the preallocated cache, which grows by one position per step."""
    model = GPT(tiny_config(n_kv_head=1, window=window)).to(device).eval()
    prompt = tokens(batch=2, length=4).to(device)
    expected = model.generate(prompt, max_new_tokens=3, temperature=0, use_cache=False)
    prefill, decode = [], []
    spy_on(monkeypatch, kernels, prefill)
    with_kvcache = kernels.attention_with_kvcache

    def spy(q, k_cache, v_cache, k, v, **kwargs):
        decode.append((q.shape[1], k_cache.shape[1], kwargs["cache_seqlens"].tolist(), kwargs["window_size"]))
        return with_kvcache(q, k_cache, v_cache, k, v, **kwargs)

    monkeypatch.setattr(kernels, "attention_with_kvcache", spy)
    got = model.set_backend("triton").generate(prompt, max_new_tokens=3, temperature=0, use_cache=True)
    window_size = (-1 if window is None else window - 1, 0)
    assert prefill == [(4, 4)] * 2
    assert decode == [(1, 32, [4, 4], window_size)] * 2 + [(1, 32, [5, 5], window_size)] * 2
    assert torch.equal(got, expected)


def _count_decode_launches(monkeypatch) -> list:
    """A list that grows by the (B, Sq, H, D) q shape of each launch of the decode kernel (the function both the eager
    path and the compiled path's custom op call)."""
    from kernels.attention import decode

    launches, attend = [], decode._attend
    monkeypatch.setattr(decode, "_attend", lambda q, *args: launches.append(tuple(q.shape)) or attend(q, *args))
    return launches


def test_compiled_generate_gives_eager_tokens_with_every_step_on_the_decode_kernel(device, monkeypatch):
    """generate(compile=True): torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) (inductor; on
    CPU without CUDA graphs) with the lengths on the device: eager's greedy tokens, past block_size (where each
    token is an eager prefill), and each compiled step runs the decode kernel in every layer."""
    model = GPT(tiny_config(block_size=12, n_kv_head=1, window=5, backend="triton")).to(device).eval()
    prompt = tokens(batch=2, length=4).to(device)
    expected = model.generate(prompt, max_new_tokens=12, temperature=0)
    launches = _count_decode_launches(monkeypatch)
    got = model.generate(prompt, max_new_tokens=12, temperature=0, compile=True)
    assert torch.equal(got, expected)
    # a prefill of the 4-token prompt, 8 decoding steps (2 layers each) until the cache holds block_size = 12
    # positions, then a prefill of the last 12 tokens per new token (the learned positions shift)
    assert launches == [(2, 1, 3, 16)] * 16


def test_decode_step_compiles_once_for_every_length(device):
    """decode_step reads no host length: one graph (fullgraph, aot_eager) for every step of two caches, logits
    equal to eager decode_step's, cache.seqlens advanced on the device; a full cache fails its device assert."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = GPT(tiny_config(block_size=8, backend="triton")).to(device).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.decode_step, backend=counter, fullgraph=True)
    for prompt_length in (3, 5):
        prompt = tokens(batch=2, length=prompt_length).to(device)
        caches = [KVCache(8), KVCache(8)]
        for cache in caches:
            model(prompt, cache=cache)
        for position in range(prompt_length, 8):
            idx = tokens(batch=2, length=1).to(device)
            assert torch.equal(compiled(idx, caches[0]), model.decode_step(idx, caches[1]))
            assert caches[0].seqlens.tolist() == [position + 1] * 2
        assert all(torch.equal(a, b) for a, b in zip(caches[0].keys + caches[0].values,
                                                     caches[1].keys + caches[1].values))
    assert counter.frame_count == 1
    with pytest.raises(RuntimeError, match="cache.seqlens"):
        compiled(idx, caches[0])


def test_decode_step_and_compile_bad_inputs():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="decode_step runs the triton backend"):
        model.decode_step(tokens(length=1), KVCache(8))
    model.set_backend("triton")
    with pytest.raises(ValueError, match="needs a cache a forward has filled"):
        model.decode_step(tokens(length=1), KVCache(8))
    with pytest.raises(TypeError, match=r"idx must be a \(B, 1\) int64"):
        model.decode_step(tokens(length=2), KVCache(8))
    with pytest.raises(TypeError, match="compile must be a bool"):
        model.generate(tokens(length=2), 1, compile="yes")
    with pytest.raises(ValueError, match="use_cache=True and backend 'triton'"):
        model.generate(tokens(length=2), 1, compile=True, use_cache=False)


def test_cache_is_preallocated_and_filled_in_place():
    model = GPT(tiny_config(n_kv_head=1)).eval()
    idx = tokens(length=6)
    cache = KVCache(capacity=8)
    model(idx[:, :5], cache=cache)
    keys = cache.keys[0]
    logits, _ = model(idx[:, 5:], cache=cache)
    assert cache.length == 6 and cache.keys[0] is keys and keys.shape == (2, 8, 1, 16)
    torch.testing.assert_close(logits[:, -1], model(idx)[0][:, -1])
    with pytest.raises(ValueError, match="capacity 8"):
        model(idx[:, :3], cache=cache)


def test_generate_sampling_respects_top_k():
    model = GPT(tiny_config()).eval()
    prompt = tokens(batch=3, length=4)
    logits, _ = model(prompt)
    allowed = logits[:, -1].topk(2).indices
    sampled = model.generate(prompt, max_new_tokens=1, temperature=1.5, top_k=2)[:, -1]
    assert (sampled[:, None] == allowed).any(dim=1).all()


def test_attention_maps_are_causal_distributions_from_the_reference_path():
    model = GPT(tiny_config(n_kv_head=1, backend="sdpa"))
    idx = tokens(batch=1, length=9)
    maps = model.attention_maps(idx)
    assert len(maps) == 2 and maps[0].shape == (1, 3, 9, 9)
    for probs in maps:
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3, 9))
        assert torch.equal(probs.masked_fill(reference.causal_mask(9, 9), 0.0), torch.zeros_like(probs))
    # Recompute layer 0 by hand: its input is the embedding, normalised.
    block = model.transformer.h[0]
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(9))
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split([48, 16, 16], dim=2)
    q, k = q.view(1, 9, 3, 16).transpose(1, 2), k.view(1, 9, 1, 16).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / 4.0
    expected = torch.softmax(scores.masked_fill(~reference.causal_mask(9, 9), float("-inf")), dim=-1)
    torch.testing.assert_close(maps[0], expected.detach())


@pytest.mark.parametrize("field,value,error,message", [
    ("n_head", 0, ValueError, "n_head must be >= 1"),
    ("n_kv_head", 0, ValueError, "n_kv_head must be >= 1"),
    ("n_embd", -48, ValueError, "n_embd must be >= 1"),
    ("vocab_size", 0, ValueError, "vocab_size must be >= 1"),
    ("block_size", -1, ValueError, "block_size must be >= 1"),
    ("n_layer", -1, ValueError, "n_layer must be >= 0"),
    ("n_head", 3.0, TypeError, "n_head must be an int"),
    ("n_layer", True, TypeError, "n_layer must be an int"),
    ("dropout", 1.5, ValueError, "dropout must be finite and in"),
    ("dropout", float("nan"), ValueError, "dropout must be finite"),
    ("dropout", "0.1", TypeError, "dropout must be a real number"),
    ("window", 0, ValueError, "window must be >= 1"),
    ("window", 2.0, TypeError, "window must be an int"),
    ("window", True, TypeError, "window must be an int"),
    ("bias", "no", TypeError, "bias must be a bool, got str"),
    ("bias", 1, TypeError, "bias must be a bool, got int"),
    ("backend", None, TypeError, "backend must be a str, got NoneType"),
    ("vocab_size", "50", TypeError, "vocab_size must be an int"),
    ("block_size", 32.0, TypeError, "block_size must be an int"),
    ("n_embd", None, TypeError, "n_embd must be an int"),
    ("n_kv_head", 1.5, TypeError, "n_kv_head must be an int"),
    ("dropout", True, TypeError, "dropout must be a real number"),
])
def test_bad_sizes_raise_naming_the_field(field, value, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**{field: value})


def test_a_model_without_blocks_is_allowed():
    logits, _ = GPT(tiny_config(n_layer=0))(tokens())
    assert logits.shape == (2, 19, 50)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
    (dict(temperature=-0.5), ValueError, "temperature must be finite and >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=None), TypeError, "temperature must be a real number"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=-3), ValueError, "top_k must be >= 1"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
])
def test_bad_generate_arguments_raise_before_any_forward(monkeypatch, kwargs, error, message):
    model = GPT(tiny_config()).eval()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran on bad arguments"))
    with pytest.raises(error, match=message):
        model.generate(tokens(length=3), **{"max_new_tokens": 2, **kwargs})


def test_generate_needs_a_non_empty_int64_prompt():
    model = GPT(tiny_config()).eval()
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="idx must be a"):
        model.generate(torch.zeros(2, 3), max_new_tokens=0)
    prompt = tokens(length=3)
    assert torch.equal(model.generate(prompt, max_new_tokens=0), prompt)


def test_bad_config_and_input_raise_naming_the_problem():
    with pytest.raises(ValueError, match="backend"):
        tiny_config(backend="cuda")
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny_config(n_kv_head=2)
    with pytest.raises(ValueError, match="n_head"):
        tiny_config(n_embd=50)
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("flash")
    with pytest.raises(ValueError, match="config.window must be None"):
        GPT(tiny_config(window=4)).set_context_parallel("zigzag")
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(length=33))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_a_cache_built_for_another_batch_size_raises_on_every_backend(backend):
    """A cache filled for batch 2 and decoded with batch 1 (which the kernel's cache_batch_idx-less read would take
    the first row of, and a copy into the buffers would broadcast), or with batch 3: ValueError naming both sizes."""
    model = GPT(tiny_config(backend=backend)).eval()
    for first, second in ((2, 1), (1, 3)):
        cache = KVCache(32)
        with torch.no_grad():
            model(tokens(batch=first, length=5), cache=cache)
            message = f"cache: built for batch size {first}, got idx of batch size {second}"
            with pytest.raises(ValueError, match=message):
                model(tokens(batch=second, length=1), cache=cache)
        assert cache.length == 5


def test_token_ids_and_positions_out_of_range_raise_naming_the_argument(monkeypatch):
    """Checked on the device (torch._assert_async: no host sync on CUDA; on CPU a RuntimeError at once), before the
    embedding lookup; positions past block_size given as a length are a host check naming idx."""
    model = GPT(tiny_config())
    monkeypatch.setattr(model.transformer.wte, "forward", lambda *a: pytest.fail("embedded out-of-range ids"))
    for bad in (50, -1):
        idx = tokens()
        idx[1, 7] = bad
        with pytest.raises(RuntimeError, match=r"idx: token ids must be in \[0, 50\)"):
            model(idx)
    for bad in (32, -2):
        positions = torch.arange(19)
        positions[3] = bad
        with pytest.raises(RuntimeError, match=r"positions: positions must be in \[0, 32\)"):
            model(tokens(), positions=positions)
    with pytest.raises(TypeError, match="positions must be an int64 tensor"):
        model(tokens(), positions=torch.arange(19, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"idx: 30 cached \+ 3 new tokens exceed block_size 32"):
        cache = KVCache(40)
        cache.length = 30
        model(tokens(length=3), cache=cache)
