"""Ring attention as a context-parallel training script uses it: under torch.compile, activation checkpointing,
gradients of some inputs or of lse only, three ranks and a subgroup whose ranks are not the global ones.

The gloo process groups are test_distributed's (spawned once per session, every case bounded in time)."""
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from kernels import distributed
from kernels.distributed import ring_attention, shard, unshard
from test_distributed import CASE_TIMEOUT_S, _single_process, case_matches_single_process, case_shard_round_trip
from tolerance import BACKWARD, assert_close


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


def test_ring_attention_under_torch_compile(groups):
    groups(2).run(case_compiled_model_runs_ring_attention_eagerly, timeout=2 * CASE_TIMEOUT_S)


def case_gradients_as_training_code_takes_them(layout, inputs, expected):
    """Gradients through lse alone (out unused: its gradient reaches the ring as None) obey the rule against the
    float64 shard; activation checkpointing (reentrant or not) and gradients of k alone give the plain run's
    gradients bit for bit; a torch.func transform is a clear NotImplementedError (torch's own error named
    nothing)."""
    q, k, v, grad_out, grad_lse = (shard(t, 2, layout) for t in inputs)

    def ring(*qkv):
        return ring_attention(*qkv, causal=True, layout=layout, return_lse=True)

    def grads(loss, need=(True, True, True)):
        leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((q, k, v), need)]
        loss(*leaves).backward()
        return [t.grad for t in leaves]

    lse_only = grads(lambda *qkv: (ring(*qkv)[1] * grad_lse).sum())
    for name, got, (exact, low, single) in zip(("dq", "dk", "dv"), lse_only, expected[2:]):
        exact, low, single = (shard(t, 2, layout) for t in (exact, low, single))
        assert_close(got, exact, low, BACKWARD, name=f"{name} vs torch's error")
        assert_close(got, exact, single, BACKWARD, name=f"{name} vs the single-process kernel's error")

    def both(out, lse):
        return (out * grad_out).sum() + (lse * grad_lse).sum()

    plain = grads(lambda *qkv: both(*ring(*qkv)))
    for reentrant in (True, False):
        checkpointed = grads(lambda *qkv: both(*torch.utils.checkpoint.checkpoint(ring, *qkv,
                                                                                  use_reentrant=reentrant)))
        assert all(torch.equal(c, p) for c, p in zip(checkpointed, plain)), f"use_reentrant={reentrant}"
    assert torch.equal(grads(lambda *qkv: both(*ring(*qkv)), need=(False, True, False))[1], plain[1])
    with pytest.raises(NotImplementedError, match="ring_attention: torch.func transforms"):
        torch.func.grad(lambda x: ring(x, k, v)[0].sum())(q)


def test_gradients_as_training_code_takes_them(groups):
    q = torch.randn(1, 2, 8, 24)
    k, v = (torch.randn(1, 1, 8, 24) for _ in range(2))
    inputs = (q, k, v, torch.randn(q.shape), torch.randn(1, 2, 8))
    groups(2).run(case_gradients_as_training_code_takes_them, layout="zigzag", inputs=inputs,
                  expected=_single_process(True, None, q, k, v, torch.zeros(q.shape), inputs[4]))


def case_subgroup_of_later_ranks(layout, inputs, expected):
    """A ring over global ranks 1 and 2 (its ranks 0 and 1: the transfers address global ranks) matches single-process
    attention; rank 0, outside it, gets a ValueError."""
    group = dist.new_group([1, 2])
    if dist.get_rank() == 0:
        with pytest.raises(ValueError, match="not a member of group"):
            ring_attention(*inputs[:3], group=group)
        return
    case_matches_single_process(layout, True, None, inputs, expected, repeat=False, group=group)


def _inputs(b, h, h_kv, n, d):
    q = torch.randn(b, h, n, d)
    k, v = (torch.randn(b, h_kv, n, d) for _ in range(2))
    return q, k, v, torch.randn(q.shape), torch.randn(b, h, n)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_three_ranks(groups, layout):
    """An odd ring (3 ranks, zigzag chunks of odd length), GQA, batch 2, zigzag run twice bit for bit (the ring of
    more than two ranks the default run has), then a subgroup of the last two ranks."""
    inputs = _inputs(2, 4, 2, 18, 24)
    groups(3).run(case_matches_single_process, layout=layout, causal=True, scale=None, inputs=inputs,
                  expected=_single_process(True, None, *inputs), repeat=layout == "zigzag")
    inputs = _inputs(1, 2, 1, 8, 40)
    groups(3).run(case_subgroup_of_later_ranks, layout=layout, inputs=inputs,
                  expected=_single_process(True, None, *inputs))


def test_shard_unshard_round_trip_on_three_ranks(groups):
    """A middle rank's zigzag chunks (1 and 4) are neither end's: what test_distributed's 2 ranks cannot show."""
    groups(3).run(case_shard_round_trip)


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
