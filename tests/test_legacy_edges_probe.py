"""Long-standing small defects at the edges of the argument checks, the row ops and the mods: each test failed
before its fix. Tiny shapes (the interpreter is slow)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels._validate import check_int
from kernels.attention import block_mask, checks, configs


@pytest.mark.parametrize("fn, torch_fn", [(kernels.softmax, torch.softmax), (kernels.log_softmax, torch.log_softmax)])
@pytest.mark.parametrize("dim", [torch.tensor(1), torch.tensor(-2, dtype=torch.int32)])
def test_softmax_dim_takes_a_0d_integer_tensor_as_torch(fn, torch_fn, dim, device):
    """torch.softmax(x, torch.tensor(1)) works (an int argument takes a 0-d integer tensor); ours was a TypeError."""
    x = torch.randn(2, 3, 5, device=device)
    torch.testing.assert_close(fn(x, dim), torch_fn(x, int(dim)))


@pytest.mark.parametrize("dim", [torch.tensor(1.0), torch.tensor(True), torch.tensor([1]), True])
def test_softmax_dim_refuses_what_torch_refuses(dim):
    x = torch.randn(2, 3)
    with pytest.raises(TypeError):
        torch.softmax(x, dim)
    with pytest.raises(TypeError, match="^dim must be an int, got"):
        kernels.softmax(x, dim)


@pytest.mark.parametrize("norm", [kernels.layer_norm, kernels.rms_norm])
def test_normalized_shape_takes_0d_integer_tensors_as_torch(norm, device):
    """F.layer_norm(x, (torch.tensor(5),)) works; a bare tensor, or a float one in the tuple, is a TypeError there
    and here."""
    x = torch.randn(2, 5, device=device)
    torch.testing.assert_close(norm(x, (torch.tensor(5),)), norm(x, (5,)))
    for bad in (torch.tensor(5), (torch.tensor(5.0),)):
        with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
            norm(x, bad)


def test_check_int_is_the_one_integer_rule():
    """An int or numpy integer, never a bool; a 0-d integer tensor only where asked (torch's rule for a dim);
    TypeError then ValueError, each naming the argument with the words given."""
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("dim", torch.tensor(2), tensor=True) == 2
    for bad in (True, 2.0, "2", None, torch.tensor(2)):
        with pytest.raises(TypeError, match="^n must be an int, got"):
            check_int("n", bad)
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0$"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"^f: B must be a non-negative int, got -1$"):
        check_int("f: B", -1, 0, what="a non-negative int", bound="a non-negative int")


def _laid_out(x, fn):
    """(a real call's output strides, those of the same call on eager fake tensors, on meta tensors)."""
    with FakeTensorMode() as mode:
        fake = fn(mode.from_tensor(x)).stride()
    return fn(x).stride(), fake, fn(x.to("meta")).stride()


@pytest.mark.parametrize("fn", [lambda x: kernels.rms_norm(x, (6,)),
                                lambda x: kernels.layer_norm(x, (4, 6)),
                                lambda x: kernels.add_rms_norm(x, x, (6,))[0],
                                lambda x: kernels.add_rms_norm(x, x, (6,))[1],
                                lambda x: kernels.add_layer_norm(x, x, (6,))[1]],
                         ids=["rms_norm", "layer_norm", "add_rms_norm y", "add_rms_norm h", "add_layer_norm h"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_norm_shape_only_outputs_are_laid_out_as_a_real_call(fn, layout, device):
    """Meta and eager fake inputs run torch's ops for the shapes; rms_norm and the residual add kept a
    channels_last (or batch-permuted) x's layout there, while the kernels return contiguous y and h."""
    x = torch.randn(2, 3, 4, 6, device=device)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(0, 1)
    real, fake, meta = _laid_out(x, fn)
    assert real == fake == meta


@pytest.mark.parametrize("norm", [kernels.layer_norm, kernels.rms_norm])
def test_norm_of_a_channels_last_input_is_right(norm, device):
    """Values and gradients right for a channels_last input (the rows are strided: a copy to unit-stride rows)."""
    x = torch.randn(2, 3, 4, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, device=device, requires_grad=True)
    y = norm(x, (6,), w)
    want = getattr(F, norm.__name__)(x.double(), (6,), w.double())
    torch.testing.assert_close(y, want.float(), atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), grad)
    wanted = torch.autograd.grad(want, (x, w), grad.double())
    for g, e in zip(got, wanted):
        torch.testing.assert_close(g, e.float(), atol=2e-5, rtol=1e-4)


@triton.jit
def _torch_in_mask(b, h, q_idx, kv_idx):
    return torch.ge(q_idx, kv_idx)


@triton.jit
def _wrong_shape_mask(b, h, q_idx, kv_idx):
    return tl.zeros((4,), tl.int1)


@triton.jit
def _torch_in_score(score, b, h, q_idx, kv_idx):
    return torch.tanh(score)


@triton.jit
def _summed_score(score, b, h, q_idx, kv_idx):
    return tl.sum(score, 1)


@triton.jit
def _one(score, b, h, q_idx, kv_idx):
    return score * 0.0 + 1.0


@triton.jit
def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _no_attention_launch(*args, **kwargs):
    raise AssertionError("attention's kernels launched before the mod was found wrong")


@pytest.mark.parametrize("kwargs, named", [
    (dict(mask_mod=_torch_in_mask), "mask_mod _torch_in_mask"),
    (dict(mask_mod=kernels.MaskMod(_wrong_shape_mask)), "mask_mod _wrong_shape_mask"),
    (dict(score_mod=kernels.ScoreMod(_torch_in_score, _one)), "score_mod _torch_in_score or its grad_fn _one"),
    (dict(score_mod=kernels.ScoreMod(_one, _summed_score)), "score_mod _one or its grad_fn _summed_score"),
])
def test_a_mod_the_kernels_cannot_evaluate_is_a_type_error_naming_it(kwargs, named, monkeypatch, device):
    """A torch function on a tile or a result of another shape surfaced as nested InterpreterErrors (on a GPU a
    compile traceback) from inside the block mask's or attention's launch; now a TypeError naming the mod first."""
    monkeypatch.setattr(configs, "launch", _no_attention_launch)
    monkeypatch.setattr(block_mask, "_launch_cells", _no_attention_launch)
    q = torch.randn(1, 1, 8, 8, device=device)
    with pytest.raises(TypeError, match=f"^{named} cannot be evaluated on tiles as the kernels evaluate it"):
        kernels.attention(q, q, q, **kwargs)


def test_a_float_mask_mod_keeps_its_message_through_the_probe(device):
    @triton.jit
    def _float_result(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).to(tl.float32)

    q = torch.randn(1, 1, 8, 8, device=device)
    with pytest.raises(TypeError, match="^mask_mod _float_result must return a bool or int tile"):
        kernels.attention(q, q, q, mask_mod=_float_result)


def test_a_good_mod_is_probed_once(monkeypatch, device):
    """The probe runs once per mod (functions and scalars), then every call skips it."""
    q = torch.randn(1, 2, 8, 8, device=device)
    mask = kernels.create_block_mask(_causal, None, None, 8, 8, device=device)
    want = kernels.attention(q, q, q, causal=True)
    torch.testing.assert_close(kernels.attention(q, q, q, mask_mod=mask), want)
    assert mask.mask_mod.key in checks._PROBED
    monkeypatch.setattr(checks, "_probe_mods", None)  # a second probe would fail
    torch.testing.assert_close(kernels.attention(q, q, q, mask_mod=mask), want)


@pytest.mark.parametrize("mod", [_torch_in_mask, kernels.MaskMod(_wrong_shape_mask)])
def test_create_block_mask_names_a_mod_the_kernels_cannot_evaluate(mod, device):
    """create_block_mask called directly (no attention call to probe the mod first) names it too."""
    name = getattr(mod, "fn", mod).__name__
    with pytest.raises(TypeError, match=f"^mask_mod {name} cannot be evaluated on tiles as the kernels evaluate it"):
        kernels.create_block_mask(mod, 1, 1, 8, 8, device=device)
