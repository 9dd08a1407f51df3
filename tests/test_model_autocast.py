"""The GPT's triton backend under CPU autocast: bf16 linear outputs meet the fp32 residual stream in the fused
residual norm, which must add and normalise them as torch does (the sdpa backend is torch's own run)."""
import copy

import torch

from tolerance import BACKWARD, assert_close
from transformer import GPT, GPTConfig


def run(model, idx, targets, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


def test_triton_backend_forward_and_backward_under_autocast():
    """Within the tolerance rule of the sdpa backend under the same autocast, against the float64 reference."""
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=3, n_embd=48))
    idx, targets = torch.randint(0, 50, (2, 19)), torch.randint(0, 50, (2, 19))
    exact = run(copy.deepcopy(model).double().set_backend("reference"), idx, targets, autocast=False)
    torch_same = run(copy.deepcopy(model).set_backend("sdpa"), idx, targets, autocast=True)
    fused = run(copy.deepcopy(model).set_backend("triton"), idx, targets, autocast=True)
    assert fused[0].dtype == torch_same[0].dtype == torch.bfloat16  # lm_head ran in bf16: autocast was on
    assert_close(fused[0], exact[0], torch_same[0], name="logits")
    assert_close(fused[1], exact[1], torch_same[1], name="loss")
    for name, grad in fused[2].items():
        assert grad.dtype == torch.float32
        assert_close(grad, exact[2][name], torch_same[2][name], factor=BACKWARD, name=f"grad of {name}")
