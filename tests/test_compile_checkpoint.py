"""The ops' first calls in a process traced inside a gradient-checkpointed region under
torch.compile(fullgraph=True): a checkpoint is a higher-order op, inside which dynamo refuses any mutation of Python
state, so no op may fill a module-level cache on its first call (the row ops' lazy DTensor lookup did, and a
compiled gradient-checkpointed Hugging Face model whose first norm call was traced there stopped with "HOP: Unsafe
side effect"). Run in a fresh interpreter: in this one earlier tests have made every first call already."""
import subprocess
import sys

_FIRST_CALLS = r"""
import torch
import kernels
from torch.utils.checkpoint import checkpoint

device = torch.device("cpu" if kernels.INTERPRETED else "cuda")
torch.manual_seed(0)
x = torch.randn(3, 40, device=device, requires_grad=True)
w = torch.randn(40, device=device, requires_grad=True)
q, k, v = (torch.randn(1, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
pad = torch.ones(1, 9, dtype=torch.bool, device=device)
pad[:, -2:] = False
packed = [t[0].transpose(0, 1) for t in (q, k, v)]
cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
ops = {
    "softmax": (lambda x: kernels.softmax(x), (x,)),
    "log_softmax": (lambda x: kernels.log_softmax(x), (x,)),
    "layer_norm": (lambda x, w: kernels.layer_norm(x, 40, w, w), (x, w)),
    "add_rms_norm": (lambda x, w: kernels.add_rms_norm(x, x, 40, w)[0], (x, w)),
    "RMSNorm": (kernels.RMSNorm(40, device=device), (x,)),
    "attention": (lambda q, k, v: kernels.attention(q, k, v, causal=True, key_padding_mask=pad), (q, k, v)),
    "attention_varlen": (lambda q, k, v: kernels.attention_varlen(q, k, v, cu, cu, 5, 5, causal=True), packed),
    "scaled_dot_product_attention": (lambda q, k, v: kernels.scaled_dot_product_attention(q, k, v, is_causal=True),
                                     (q, k, v)),
}
for name, (op, args) in ops.items():
    compiled = torch.compile(lambda *a: checkpoint(op, *a, use_reentrant=False), fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    grads = torch.autograd.grad(got.square().sum(), args)
    expected = op(*args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    print("ok", name)
"""


def test_first_calls_trace_inside_a_checkpointed_region():
    run = subprocess.run([sys.executable, "-c", _FIRST_CALLS], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.split() == [word for name in ("softmax", "log_softmax", "layer_norm", "add_rms_norm", "RMSNorm",
                                                    "attention", "attention_varlen", "scaled_dot_product_attention")
                                  for word in ("ok", name)]
