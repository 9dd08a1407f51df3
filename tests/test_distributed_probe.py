"""Ring attention's bad inputs raise as ``kernels.attention``'s do (the flags checked, the function named), on
every rank together; a context-parallel GPT's default positions.

The gloo process groups are test_distributed's (spawned once per session, every case bounded in time)."""
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from kernels.distributed import ring_attention, shard
from test_distributed import AGREEMENT_TIMEOUT_S
from transformer.model import GPT, GPTConfig


def case_flags_are_checked_like_kernels_attention():
    """causal="False" ran the causal ring and causal=None the full one (``bool()`` of anything), and
    return_lse="no" returned a tuple, where kernels.attention raises a TypeError naming the flag. A bad flag on
    one rank only: that rank's TypeError, the others a ValueError naming it, before any ring step (no rank is
    left waiting in the ring)."""
    rank = dist.get_rank()
    q = torch.randn(1, 2, 4, 8)
    for flags in ({"causal": "False"}, {"causal": None}, {"return_lse": "no"}):
        with pytest.raises(TypeError, match=f"{next(iter(flags))} must be a bool"):
            ring_attention(q, q, q, **flags)
    with pytest.raises(TypeError if rank == 1 else ValueError,
                       match="return_lse must be a bool" if rank == 1 else "rank 1 failed its input check"):
        ring_attention(q, q, q, return_lse="no" if rank == 1 else False)
    # ints and numpy bools pass, as in kernels.attention; and the ring still lines up afterwards
    out, lse = ring_attention(q, q, q, causal=np.True_, return_lse=1)
    assert torch.equal(out, ring_attention(q, q, q, causal=True)) and lse.shape == (1, 2, 4)


def case_forward_ad_error_names_ring_attention():
    """Forward-mode AD raises on every rank, naming ring_attention (the function the user called), not a helper
    of the package's; the ring still lines up afterwards."""
    q = torch.randn(1, 2, 4, 8)
    named = r"^(kernels\.distributed\.)?ring_attention: forward-mode AD"
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=named):
        ring_attention(fwAD.make_dual(q, torch.ones_like(q)), q, q)
    assert ring_attention(q, q, q).shape == q.shape


@pytest.mark.parametrize("case", [case_flags_are_checked_like_kernels_attention,
                                  case_forward_ad_error_names_ring_attention])
def test_bad_inputs_raise_on_every_rank(groups, case):
    groups(2).run(case, timeout=AGREEMENT_TIMEOUT_S)


def case_gpt_defaults_to_its_shards_positions(layout):
    """A context-parallel GPT called without ``positions`` embedded 0..T_local-1 on every rank (rank 0's first
    chunk's positions: wrong for every other chunk), silently; it now defaults to its shard's, so its logits are
    those of passing them, and the full model's at the shard's tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                          backend="triton"))
    idx = torch.randint(0, 29, (1, 12))
    full, _ = model(idx)
    model.set_context_parallel(layout)
    local = shard(idx, 1, layout)
    default, _ = model(local)
    given, _ = model(local, positions=shard(torch.arange(12), 0, layout))
    torch.testing.assert_close(default, given, rtol=0, atol=0)
    torch.testing.assert_close(default, shard(full, 1, layout), rtol=1e-5, atol=1e-5)
    if layout == "zigzag":  # 2 chunks per rank
        with pytest.raises(ValueError, match="idx: 3 positions per rank do not split"):
            model(idx[:, :3])


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_context_parallel_gpt_defaults_to_its_shards_positions(groups, layout):
    groups(2).run(case_gpt_defaults_to_its_shards_positions, timeout=AGREEMENT_TIMEOUT_S, layout=layout)
