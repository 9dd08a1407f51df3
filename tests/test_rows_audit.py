"""Regression tests of the row kernels (softmax, layer/RMS norm) and patch() as torch's and Hugging Face's users call
them: second derivatives (create_graph=True, torch.func.grad / jacrev) against float64 torch within the tolerance
rule; RMS norm's default eps; torch.compile (fullgraph, dynamic shapes, mixed dtypes, a patched model); CUDA
autocast; numpy integers; DTensors; a patched model saved, loaded, deep-copied and patched twice."""
import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _rows as rows_module, reference
from kernels.layernorm import torch_rms_norm
from tolerance import BACKWARD, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")


def _torch_softmax(x, dim=-1, *, scale=1.0, causal=False, log=False):
    """torch's (log-)softmax of ``x * scale``; with ``causal``, kernels.softmax's bottom-right mask."""
    z = x * scale
    if causal:
        z = z.masked_fill(~reference.causal_mask(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)


SOFTMAXES = {
    "softmax": (lambda x: kernels.softmax(x, 1, scale=0.7), lambda x: _torch_softmax(x, 1, scale=0.7)),
    "causal": (lambda x: kernels.softmax(x, scale=-1.3, causal=True),
               lambda x: _torch_softmax(x, scale=-1.3, causal=True)),
    "log_softmax": (lambda x: kernels.log_softmax(x, 0, scale=2.0),
                    lambda x: _torch_softmax(x, 0, scale=2.0, log=True)),
}


def _gradient_penalty(fn, x, weights):
    """d/dx of |d/dx sum(weights * fn(x)^2)|^2: a second derivative through ``fn`` (create_graph=True)."""
    x = x.detach().requires_grad_()
    y = fn(x)
    (g,) = torch.autograd.grad((weights.to(y.dtype) * y * y).sum(), x, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(g.pow(2).sum(), x)
    return penalty_grad


@pytest.mark.parametrize("name", SOFTMAXES)
def test_softmax_second_derivative(name, device):
    """Double backward through kernels.softmax / log_softmax: was silently wrong (the kernel's dx carried no graph,
    so the second derivative missed every term through the softmax's backward)."""
    ours, theirs = SOFTMAXES[name]
    x = torch.randn(2, 5, 7, device=device)
    weights = torch.randn(2, 5, 7, device=device)
    got = _gradient_penalty(ours, x, weights)
    assert_close(got, _gradient_penalty(theirs, x.double(), weights), _gradient_penalty(theirs, x, weights),
                 BACKWARD, name="second derivative")


@pytest.mark.parametrize("name", SOFTMAXES)
def test_softmax_torch_func_grad_and_jacrev(name, device):
    """torch.func.grad and jacrev run the backward on functorch's wrapped tensors: they crashed inside the Triton
    launcher (NotImplementedError: Cannot access storage of TensorWrapper)."""
    ours, theirs = SOFTMAXES[name]
    x = torch.randn(3, 4, 5, device=device)
    weights = torch.randn(3, 4, 5, device=device)
    for transform in (lambda f: torch.func.grad(lambda t: (weights.to(t.dtype) * f(t)).sum()), torch.func.jacrev):
        assert_close(transform(ours)(x), transform(theirs)(x.double()), transform(theirs)(x), BACKWARD)


def _torch_norm(rms, x, residual, weight, bias, **options):
    """torch's norm of x (+ residual) in x's dtype: F.layer_norm, or kernels.layernorm.torch_rms_norm."""
    h = x if residual is None else x + residual
    if rms:
        return torch_rms_norm(h, h.shape[-1], weight, 1e-5, **options)
    return F.layer_norm(h, h.shape[-1:], weight, bias, 1e-5)


def _kernel_norm(rms, x, residual, weight, bias, **options):
    """The kernels' norm of x (+ residual), its y only."""
    if rms:
        return (kernels.rms_norm(x, x.shape[-1], weight, 1e-5, **options) if residual is None
                else kernels.add_rms_norm(x, residual, x.shape[-1], weight, 1e-5, **options)[0])
    return (kernels.layer_norm(x, x.shape[-1], weight, bias, 1e-5) if residual is None
            else kernels.add_layer_norm(x, residual, x.shape[-1], weight, bias, 1e-5)[0])


NORMS = {"layer": (False, {}), "rms": (True, {}), "rms gemma offset": (True, {"offset": 1.0}),
         "rms llama": (True, {"casting_mode": "llama"})}


def _norm_penalty_grads(fn, inputs, weights):
    """Gradients of every input of |d/d(inputs) sum(weights * fn(*inputs)^2)|^2 (create_graph=True)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs)
    grads = torch.autograd.grad((weights.to(y.dtype) * y * y).sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", NORMS)
def test_norm_second_derivative(name, residual, device):
    """Double backward through the norms (x, residual, weight, bias): was silently wrong, the kernels' gradients
    carrying no graph."""
    rms, options = NORMS[name]
    n = 13
    inputs = [torch.randn(3, 2, n, device=device), torch.randn(3, 2, n, device=device) if residual else None,
              torch.rand(n, device=device) + 0.5, None if rms else torch.randn(n, device=device)]
    given = [i for i, t in enumerate(inputs) if t is not None]

    def call(norm, dtype):
        def fn(*tensors):
            args = list(inputs)
            for i, t in zip(given, tensors):
                args[i] = t
            return norm(rms, *args, **options)
        return _norm_penalty_grads(fn, [inputs[i].to(dtype) for i in given], weights)

    weights = torch.randn(3, 2, n, device=device)
    got = call(_kernel_norm, torch.float32)
    want64, want32 = call(_torch_norm, torch.float64), call(_torch_norm, torch.float32)
    for i, g, g64, g32 in zip(given, got, want64, want32):
        assert_close(g, g64, g32, BACKWARD, name=f"second derivative of input {i}")


@pytest.mark.parametrize("name", NORMS)
def test_norm_torch_func_grad_and_jacrev(name, device):
    """torch.func.grad (of x and weight) and jacrev through the norms: they crashed inside the Triton launcher."""
    rms, options = NORMS[name]
    x, weight = torch.randn(4, 6, device=device), torch.rand(6, device=device) + 0.5
    bias = None if rms else torch.randn(6, device=device)
    weights = torch.randn(4, 6, device=device)

    def transforms(norm, dtype):
        x_, weight_, bias_ = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        loss = lambda t, w: (weights.to(dtype) * norm(rms, t, None, w, bias_, **options)).sum()
        return (*torch.func.grad(loss, argnums=(0, 1))(x_, weight_),
                torch.func.jacrev(lambda t: norm(rms, t, None, weight_, bias_, **options))(x_))

    got = transforms(_kernel_norm, torch.float32)
    for g, g64, g32 in zip(got, transforms(_torch_norm, torch.float64), transforms(_torch_norm, torch.float32)):
        assert_close(g, g64, g32, BACKWARD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"offset": 1.0, "casting_mode": "llama"}])
def test_rms_norm_default_eps_is_torch_one(dtype, options, device):
    """eps=None is fp32's machine epsilon for fp16/bf16 x, as torch's F.rms_norm / nn.RMSNorm compute it: it was
    finfo(x.dtype).eps, 6e4 times as large for bf16, so rows of small values came out several times too small."""
    x = (torch.randn(4, 24, device=device) * 0.01).to(dtype)
    weight = torch.rand(24, device=device).to(dtype) + 0.5
    eps = torch.finfo(torch.float32).eps
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (options.get("offset", 0.0) + weight.double())
    torch_same_precision = torch_rms_norm(x, 24, weight, eps, **options)
    assert_close(kernels.rms_norm(x, 24, weight, **options), want, torch_same_precision)
    module = kernels.RMSNorm(24, device=device, dtype=dtype, **options)
    with torch.no_grad():
        module.weight.copy_(weight)
    assert_close(module(x), want, torch_same_precision)
    assert_close(torch_rms_norm(x, 24, weight, **options), want, torch_same_precision)
    if not options:  # torch's own, the drop-in's model
        assert_close(F.rms_norm(x, (24,), weight), want, torch_same_precision)


def _saved_and_loaded_unregistered(model, path, monkeypatch):
    """torch.load of torch.save(model) with the kernel's name unregistered from transformers' interfaces (as in a
    fresh process), asserting that loading registered it again."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface
    from transformer import hf

    torch.save(model, path)
    interfaces = (transformers.AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    for mapping in interfaces:
        monkeypatch.delitem(mapping, hf.ATTENTION_NAME)
    loaded = torch.load(path, weights_only=False)
    assert all(hf.ATTENTION_NAME in mapping for mapping in interfaces)
    return loaded


def test_a_patched_hugging_face_model_pickles_deep_copies_and_patches_once(device, tmp_path, monkeypatch):
    """torch.save of a patched model raised PicklingError (closures named as transformers' functions); a deepcopy's
    init_continuous_batching (generate_batch's entry) built its manager on the ORIGINAL model, whose weights it
    would run; patching again wrapped the wrappers again. Loading registers the kernel with transformers (as in a
    fresh process)."""
    transformers = pytest.importorskip("transformers")
    from test_hf import tiny_llama
    from transformer import hf, patch

    model = patch(patch(tiny_llama().to(device)))
    assert not isinstance(model.init_continuous_batching.init, hf.ContinuousBatchingOnKernels)
    ids = torch.randint(0, 50, (2, 7), device=device)
    with torch.no_grad():
        want = model(ids).logits
    loaded = _saved_and_loaded_unregistered(model, tmp_path / "model.pt", monkeypatch)
    copied = copy.deepcopy(model)
    for other in (loaded, copied):
        assert other.config._attn_implementation == hf.ATTENTION_NAME
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, want, rtol=0, atol=0)
        manager = other.init_continuous_batching(transformers.GenerationConfig(max_new_tokens=1, eos_token_id=None))
        assert manager.model is other


def test_a_patched_encoder_registers_the_kernel_when_loaded(device, tmp_path, monkeypatch):
    """A patched model without generate() (BERT) carries no continuous-batching entry, so only its
    ``_kernel_registration`` registers the kernel when torch.load unpickles it; an object with an empty __dict__
    was never given __setstate__ by pickle. The loaded model runs, with the saved one's output."""
    transformers = pytest.importorskip("transformers")
    from transformer import patch

    config = transformers.BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    model = patch(transformers.BertModel(config).to(device).eval())
    ids = torch.randint(0, 50, (2, 7), device=device)
    with torch.no_grad():
        want = model(ids).last_hidden_state
    loaded = _saved_and_loaded_unregistered(model, tmp_path / "model.pt", monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, want, rtol=0, atol=0)


@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_of_mixed_dtypes_compiles_in_one_graph(rms, device):
    """add_layer_norm / add_rms_norm of a bf16 x and an fp32 residual under torch.compile(fullgraph=True): the dtype
    promotion (torch.result_type) broke the graph, so fullgraph raised Unsupported. Same values and gradients as
    eager."""
    fn = kernels.add_rms_norm if rms else kernels.add_layer_norm

    def step(x, residual, weight):
        y, h = fn(x, residual, 8, weight)
        return y * h

    inputs = (torch.randn(3, 8, device=device, dtype=torch.bfloat16), torch.randn(3, 8, device=device),
              torch.rand(8, device=device) + 0.5)
    runs = []
    for run in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = run(*leaves)
        out.backward(torch.ones_like(out))
        runs.append((out, *(t.grad for t in leaves)))
    assert runs[1][0].dtype == torch.float32
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("call", ["function", "module"])
def test_rms_norm_compiles_with_dynamic_shapes(call, device):
    """rms_norm and RMSNorm under torch.compile(fullgraph=True, dynamic=True): the offset check (math.isfinite)
    could not be traced there, so fullgraph raised Unsupported. Same values as eager at two batch sizes."""
    module = kernels.RMSNorm(8, device=device)
    fn = module if call == "module" else lambda x: kernels.rms_norm(x, 8, module.weight)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (3, 5):
            x = torch.randn(rows, 8, device=device)
            torch.testing.assert_close(compiled(x), fn(x), rtol=0, atol=0)


def test_rms_norm_offset_must_still_be_finite():
    """The traceable offset check still refuses NaN and both infinities."""
    for offset in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="offset must be finite"):
            kernels.rms_norm(torch.randn(2, 8), 8, torch.ones(8), offset=offset)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_under_cuda_autocast_runs_in_fp32_as_torch(log, monkeypatch, device):
    """CUDA autocast runs torch.softmax / log_softmax in fp32 (its fp32 list: the dispatcher says so); the kernels
    returned fp16/bf16. Shown on CPU by declaring it such a device, as for the norms."""
    op = "aten::log_softmax.int" if log else "aten::softmax.int"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCPU")
    ours, theirs = (kernels.log_softmax, torch.log_softmax) if log else (kernels.softmax, torch.softmax)
    x = (torch.randn(4, 24, device=device) * 4).to(torch.bfloat16).requires_grad_()
    if device.type == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours(x, -1).dtype == theirs(x, -1).dtype == torch.bfloat16
        monkeypatch.setattr(rows_module, "AUTOCAST_FP32_DEVICES", ("cpu",))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ours(x, -1, scale=0.5)
    assert y.dtype == torch.float32
    want = theirs(x.float() * 0.5, -1)
    torch.testing.assert_close(y, want)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, torch.autograd.grad(want, x, torch.ones_like(want))[0])


def test_a_plain_backward_still_runs_the_kernels(monkeypatch, device):
    """Only create_graph=True takes the differentiable torch-ops backward: a plain backward (grad mode off inside
    it) launches the kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch-ops backward ran in a plain backward")

    monkeypatch.setattr(importlib.import_module("kernels.softmax"), "_differentiable_backward", refuse)
    monkeypatch.setattr(importlib.import_module("kernels.layernorm"), "_differentiable_backward", refuse)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    weight = torch.rand(8, device=device, requires_grad=True)
    loss = (kernels.softmax(x).pow(2).sum() + kernels.log_softmax(x, 0).sum()
            + kernels.layer_norm(x, 8, weight).pow(2).sum() + kernels.add_rms_norm(x, x, 8, weight)[0].pow(2).sum())
    loss.backward()
    assert x.grad is not None and weight.grad is not None


def test_numpy_integers_are_taken_as_torch_takes_them(device):
    """A numpy integer as softmax's dim, a norm's normalized_shape or a norm module's size (torch accepts them all;
    ours raised TypeError); a bool or a float is still refused."""
    x = torch.randn(2, 3, 8, device=device)
    torch.testing.assert_close(kernels.softmax(x, np.int64(1)), torch.softmax(x, 1))
    torch.testing.assert_close(kernels.log_softmax(x, np.int32(-1)), torch.log_softmax(x, -1))
    torch.testing.assert_close(kernels.layer_norm(x, [np.int64(3), np.int64(8)]), F.layer_norm(x, (3, 8)))
    torch.testing.assert_close(kernels.rms_norm(x, np.int64(8)), F.rms_norm(x, (8,)))
    for ours, theirs in ((kernels.LayerNorm, torch.nn.LayerNorm), (kernels.RMSNorm, torch.nn.RMSNorm)):
        torch.testing.assert_close(ours(np.int64(8), device=device)(x), theirs(np.int64(8), device=device)(x))
    for dim in (True, 1.0, np.float64(1.0)):
        with pytest.raises(TypeError, match="dim must be an int"):
            kernels.softmax(x, dim)
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        kernels.layer_norm(x, (np.float32(8),))


def test_a_patched_hugging_face_model_compiles_in_one_graph(device, fresh_dynamo):
    """torch.compile(fullgraph=True) of a patched Llama's training forward: kernel_mask's ContextVar read
    (DenseMasksForGenerate's flag) could not be traced, so it raised Unsupported where transformers' own SDPA
    model compiles. Same loss and gradients as the eager patched model."""
    pytest.importorskip("transformers")
    from test_hf import tiny_llama
    from transformer import patch

    model = patch(tiny_llama(layers=1).to(device).train())  # compiling dominates: one layer shows the path
    ids = torch.randint(1, 50, (2, 9), device=device)
    losses, grads = [], []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):  # dynamo's refusal, not inductor
        model.zero_grad()
        loss = run(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0])
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("placement", ["shard rows", "shard softmax dim", "shard queries", "replicate", "partial"])
@pytest.mark.parametrize("op", ["softmax", "causal", "log_softmax dim 1"])
def test_softmax_of_a_dtensor_computes_local_rows_as_torch_places_them(mesh, placement, op):
    """kernels.softmax / log_softmax of a DTensor (the norms take DTensors): it crashed inside the Triton launcher
    ("Attempted to access the data pointer on an invalid python storage"). Now the softmax dim (and a causal
    softmax's query dim) is gathered, other shardings kept: y and x's gradient hold torch's values."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    dim = 1 if op == "log_softmax dim 1" else 2
    fn = {"softmax": lambda t: kernels.softmax(t, scale=0.5), "causal": lambda t: kernels.softmax(t, causal=True),
          "log_softmax dim 1": lambda t: kernels.log_softmax(t, 1)}[op]
    sharded = {"shard rows": 0, "shard softmax dim": dim, "shard queries": 1}.get(placement)
    full = torch.randn(2, 5, 6)
    if placement == "partial":
        x = DTensor.from_local(full.clone(), mesh, [Partial()])
    else:
        x = distribute_tensor(full, mesh, [Replicate() if sharded is None else Shard(sharded)])
    x = x.detach().requires_grad_()
    y = fn(x)
    kept = sharded is not None and sharded != dim and not (op == "causal" and sharded == 1)
    assert isinstance(y, DTensor) and tuple(y.placements) == ((Shard(sharded),) if kept else (Replicate(),))
    x_ref = full.clone().requires_grad_()
    y_ref = fn(x_ref)
    dy = torch.randn_like(y_ref)
    y.backward(distribute_tensor(dy, mesh, y.placements))
    y_ref.backward(dy)
    torch.testing.assert_close(y.full_tensor(), y_ref)
    torch.testing.assert_close(x.grad.full_tensor(), x_ref.grad)


def test_vmap_of_softmax_and_the_norms_gives_torchs_answers():
    """Under torch.vmap the row ops run torch's ops (a Triton launch cannot read batched tensors): vmap itself and
    vmap(grad) (per-sample gradients) give torch's results."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 6), torch.randn(6)
    pairs = [(lambda t: kernels.softmax(t, dim=0), lambda t: torch.softmax(t, 0)),
             (lambda t: kernels.log_softmax(t), lambda t: torch.log_softmax(t, -1)),
             (lambda t: kernels.layer_norm(t, (6,), w), lambda t: F.layer_norm(t, (6,), w)),
             (lambda t: kernels.rms_norm(t, (6,), w), lambda t: F.rms_norm(t, (6,), w))]
    for ours, theirs in pairs:
        torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))
        torch.testing.assert_close(vmap(grad(lambda t: ours(t).square().sum()))(x),
                                   vmap(grad(lambda t: theirs(t).square().sum()))(x))
