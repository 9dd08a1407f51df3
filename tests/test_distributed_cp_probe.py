"""Context parallelism as a torch.distributed user combines it: DTensor inputs to ring attention, shard and unshard
(a clear TypeError on every rank), torch's ``context_parallel`` sharding against ours, and FSDP2 (``fully_shard``)
over the same ranks as the ring, on a GPT running the kernels.

The gloo process groups are test_distributed's (spawned once per session, every case bounded in time)."""
import copy

import pytest
import torch
import torch.distributed as dist

from kernels.distributed import ring_attention, shard, unshard
from test_distributed import AGREEMENT_TIMEOUT_S, CASE_TIMEOUT_S
from tolerance import BACKWARD, FORWARD, assert_close
from transformer import GPT, GPTConfig


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (dist.get_world_size(),))


def case_dtensor_inputs_are_a_type_error():
    """A DTensor q (a context-parallel user's natural input) reached the ring's first send and failed there with
    "c10d.send.default does not have a sharding strategy"; shard() of one returned a DTensor whose value differs per
    rank (the invariant a DTensor promises broken, silently), unshard() failed inside all_gather. Each is now a
    TypeError naming the argument and what to pass; a DTensor on one rank only stops the others at once too."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh, rank = _mesh(), dist.get_rank()
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 8)
    for placement in (Shard(2), Replicate()):
        d = distribute_tensor(q, mesh, [placement])
        with pytest.raises(TypeError, match=r"^q must be a plain torch.Tensor, got a DTensor .*q.to_local\(\)"):
            ring_attention(d, d, d, causal=True)
        with pytest.raises(TypeError, match=r"^v must be a plain torch.Tensor, got a DTensor"):
            ring_attention(shard(q), shard(q), distribute_tensor(shard(q), mesh, [Replicate()]))
        with pytest.raises(TypeError, match=r"^x must be a plain torch.Tensor, got a DTensor .*x.full_tensor\(\)"):
            shard(d)
        with pytest.raises(TypeError, match=r"^x_local must be a plain torch.Tensor, got a DTensor"):
            unshard(d)
    d = distribute_tensor(q, mesh, [Shard(2)])
    with pytest.raises(TypeError if rank == 1 else ValueError,
                       match="got a DTensor" if rank == 1 else "rank 1 failed its input check"):
        ring_attention(d if rank == 1 else d.to_local(), d.to_local(), d.to_local())
    # what the message says to pass works: a Shard(2) DTensor's local tensor is the contiguous layout's shard
    out = ring_attention(d.to_local(), d.to_local(), d.to_local(), causal=True, layout="contiguous")
    torch.testing.assert_close(unshard(out, 2, "contiguous"),
                               torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_dtensor_inputs_are_a_type_error_on_every_rank(groups):
    groups(2).run(case_dtensor_inputs_are_a_type_error, timeout=AGREEMENT_TIMEOUT_S)


def case_torch_context_parallel_shards_as_zigzag():
    """torch's ``context_parallel`` buffer sharding (head-tail load balancing) is our zigzag layout: the same
    positions per rank, ``unshard`` restores its shards and ring attention on them is the whole sequence's."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    mesh = _mesh()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                v.repeat_interleave(2, 1), is_causal=True)
    buffers = [t.clone() for t in (q, k, v)]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        assert all(torch.equal(b, shard(t)) for b, t in zip(buffers, (q, k, v)))
        out = ring_attention(*buffers, causal=True)
        assert torch.equal(unshard(out), context_parallel_unshard(mesh, [out], [2])[0])
    torch.testing.assert_close(unshard(out), expected)


def test_torch_context_parallel_shards_as_zigzag(groups):
    groups(2).run(case_torch_context_parallel_shards_as_zigzag)


CONFIG = dict(vocab_size=29, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, dropout=0.0)


def _grads(model, idx, targets):
    model.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def case_fsdp2_with_ring_attention(layout, state, idx, targets, exact, low):
    """FSDP2 (every block and the root) over the ranks that also split the sequence: each rank's mean loss on its
    shard, FSDP's mean over ranks of the gradients, is the whole batch's loss and gradient (float64 single process,
    fp32 the noise); one optimizer step later the parameters agree too."""
    from torch.distributed.fsdp import fully_shard
    mesh = _mesh()
    model = GPT(GPTConfig(**CONFIG, backend="triton"))
    model.load_state_dict(state)
    model.set_context_parallel(layout)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss, grads = _grads(model, shard(idx, 1, layout), shard(targets, 1, layout))
    dist.all_reduce(loss)
    assert_close(loss / dist.get_world_size(), exact["loss"], low["loss"], FORWARD, name="loss")
    for name, grad in grads.items():
        assert_close(grad.full_tensor(), exact["grads"][name], low["grads"][name], BACKWARD, name=f"{name}.grad")
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for name, p in model.named_parameters():
        assert_close(p.full_tensor(), exact["stepped"][name], low["stepped"][name], BACKWARD, name=name)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_fsdp2_with_ring_attention_matches_single_process(groups, layout):
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CONFIG, backend="reference"))
    idx, targets = torch.randint(0, 29, (2, 16)), torch.randint(0, 29, (2, 16))

    def run(dtype):
        model = copy.deepcopy(base).to(dtype)
        loss, grads = _grads(model, idx, targets)
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        return {"loss": loss, "grads": grads, "stepped": {n: p.detach() for n, p in model.named_parameters()}}

    groups(2).run(case_fsdp2_with_ring_attention, timeout=CASE_TIMEOUT_S, layout=layout, state=base.state_dict(),
                  idx=idx, targets=targets, exact=run(torch.float64), low=run(torch.float32))
