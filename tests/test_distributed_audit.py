"""Ring attention as a context-parallel training script uses it: under torch.compile, activation checkpointing,
gradients of some inputs or of lse only, three ranks and a subgroup whose ranks are not the global ones.

The gloo process groups are test_distributed's (spawned once per module, every case bounded in time)."""
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from benchmarks import context_parallel
from kernels import distributed
from kernels.distributed import ring_attention, shard, unshard
from test_distributed import CASE_TIMEOUT_S, groups  # noqa: F401  (groups: the fixture)
from tolerance import BACKWARD, FORWARD, assert_close


def _loss_and_grads(attend, q, k, v, loss):
    """(loss, (dq, dk, dv)) of ``loss(*attend(q, k, v))``, each input's gradient zeros where it is unused."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    value = loss(*attend(*leaves))
    value.backward()
    return value.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def case_compiled_model_runs_ring_attention_eagerly():
    """torch.compile of a function that calls ring_attention (and unshard) gives eager's loss and gradients (Dynamo
    traced into the ring and failed inside the launches: ring_attention is a graph break)."""
    torch.manual_seed(0)  # the same full sequence on every rank
    q, k, v = (shard(torch.randn(1, 2, 8, 16)) for _ in range(3))

    def step(q, k, v):
        out = ring_attention(q * 2, k, v, causal=True, return_lse=True)[0] * 3
        return out, unshard(out.detach())

    def loss(out, full):
        assert torch.equal(full[:, :, :2], out[:, :, :2]) if dist.get_rank() == 0 else full.shape == (1, 2, 8, 16)
        return out.square().sum()

    eager = _loss_and_grads(step, q, k, v, loss)
    compiled = _loss_and_grads(torch.compile(step, backend="eager"), q, k, v, loss)
    assert torch.equal(compiled[0], eager[0])
    assert all(torch.equal(c, e) for c, e in zip(compiled[1], eager[1]))


def test_ring_attention_under_torch_compile(groups):  # noqa: F811
    groups(2).run(case_compiled_model_runs_ring_attention_eagerly, timeout=2 * CASE_TIMEOUT_S)


@pytest.mark.parametrize("backend,on_cuda,expected", [("nccl", True, "cuda:1"), ("nccl", False, "cuda:0"),
                                                      ("gloo", True, "cpu")])
def test_nccl_agreement_gathers_on_the_callers_device(monkeypatch, backend, on_cuda, expected):
    """The ranks' agreement tensor goes where the caller's tensors are: a script that moves them to cuda:LOCAL_RANK
    without torch.cuda.set_device had every rank gather on cuda:0 (the current device). No GPU here: the backend,
    the current device and a CUDA tensor are stand-ins."""
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    like = mock.Mock(spec=torch.Tensor, is_cuda=on_cuda, device=torch.device("cuda:1" if on_cuda else "cpu"))
    assert distributed._collective_device(None, like) == torch.device(expected)
