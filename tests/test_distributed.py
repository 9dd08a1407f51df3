"""Ring attention (kernels/distributed.py) on 2 (4 with --runslow) gloo processes on CPU, against one process.

Every rank builds the same full sequence, computes the float64 reference, PyTorch's same-precision result and the
single-process kernel on it, then shards them; its ring_attention shard must obey the tolerance rule against the
float64 shard (forward, lse, dq/dk/dv). The processes are spawned once per world size and test session
(conftest's ``groups``) and serve every case.
"""
import importlib
import math
import multiprocessing
import os
import queue
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import kernels
from kernels import distributed, reference
from kernels.distributed import Block, plan, ring_attention, ring_plans, shard, unshard
from conftest import free_port
from tolerance import BACKWARD, FORWARD, assert_close
from transformer.train import train

FP16, FP32 = torch.float16, torch.float32
CASE_TIMEOUT_S = 60  # also the gloo timeout of every collective
START_TIMEOUT_S = 120  # P fresh processes on a shared 2-core machine import torch and triton and warm the kernels


# ------------------------------------------------------------------------------- what each rank runs


def _attention_with_grads(fn, q, k, v, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of ``fn(q, k, v) -> (out, lse)`` with incoming gradients for both outputs."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return tuple(t.detach() for t in (out, lse, *grads))


def _single_process(causal, scale, q, k, v, grad_out, grad_lse):
    """On the full sequence, for each of out, lse, dq, dk, dv: (float64 reference, PyTorch in the inputs'
    precision, the single-process kernel)."""
    def ref(*qkv):
        return reference.attention(*qkv, causal=causal, scale=scale, return_lse=True)

    exact = _attention_with_grads(ref, q.double(), k.double(), v.double(), grad_out, grad_lse)
    low = _attention_with_grads(ref, q, k, v, grad_out, grad_lse)
    single = _attention_with_grads(lambda *qkv: kernels.attention(*qkv, causal=causal, scale=scale, return_lse=True),
                                   q, k, v, grad_out, grad_lse)
    return list(zip(exact, low, single))


def case_matches_single_process(layout, causal, scale, inputs, expected, repeat, group=None):
    """This rank's ring_attention shard of out, lse, dq, dk, dv obeys the rule against the float64 shard, both
    with PyTorch's error and with the single-process kernel's as the baseline; with ``repeat``, a second run
    (forward and backward) is bitwise identical. The sequence is split over ``group`` (None: the default one)."""
    def ring(*qkv):
        return ring_attention(*qkv, causal=causal, scale=scale, layout=layout, return_lse=True, group=group)

    local = [shard(t, 2, layout, group) for t in inputs]
    got = _attention_with_grads(ring, *local)
    assert got[0].shape == local[0].shape
    for name, g, (e, lo, s) in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        factor = FORWARD if name in ("out", "lse") else BACKWARD
        e, lo, s = (shard(t, 2, layout, group) for t in (e, lo, s))
        assert g.dtype == s.dtype, name
        assert_close(g, e, lo, factor, name=f"{name} vs torch's error")
        assert_close(g, e, s, factor, name=f"{name} vs the single-process kernel's error")
    if repeat:
        assert all(torch.equal(x, y) for x, y in zip(got, _attention_with_grads(ring, *local))), "not deterministic"


def case_shard_round_trip():
    """shard copies exactly this rank's chunks; unshard restores the full tensor bit for bit, along any dim."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(2 * world * 3 * 4 * world * 5, dtype=FP32).reshape(2 * world, 3, 4 * world, 5)
    assert torch.equal(shard(x, 2, "contiguous"), x[:, :, 4 * rank:4 * rank + 4])
    chunks = x.split(2, dim=2)
    assert torch.equal(shard(x, 2, "zigzag"), torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], 2))
    for layout in ("contiguous", "zigzag"):
        for dim in (2, -2, 0):
            mine = shard(x, dim, layout)
            assert mine.data_ptr() != x.data_ptr()
            assert torch.equal(unshard(mine, dim, layout), x)


def case_bad_inputs_raise():
    """Every rank raises the same clear error, before any ring traffic (none hangs)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="striped")
    # N_local odd: no zigzag; the message speaks of the local length the caller passed (it gave only the whole's)
    with pytest.raises(ValueError, match=r"q: 3 positions per rank do not split .* \(N_local must be even"):
        ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="same 4 positions"):
        ring_attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ring_attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="ranks disagree"):
        mine = q[:, :, :2 * (rank + 1)]  # a different length on every rank
        ring_attention(mine, mine, mine)
    with pytest.raises(ValueError, match="ranks disagree"):
        ring_attention(q, q, q, causal=rank == 0)
    with pytest.raises(ValueError, match="x: a sequence of length 6"):
        shard(torch.zeros(1, 1, 6, 1), layout="zigzag" if world == 2 else "contiguous")
    with pytest.raises(ValueError, match=r"dim must be in \[-4, 4\) for x of shape \(1, 2, 4, 8\), got 4"):
        shard(q, 4)
    with pytest.raises(TypeError, match="dim must be an int"):
        shard(q, 2.0)
    # and the ring still works afterwards: nothing was left half-sent
    assert ring_attention(q, q, q).shape == q.shape


def case_double_backward_raises():
    """A create_graph=True backward gives the kernels' gradients, behind a node that raises if differentiated
    again (the backward ring is not differentiable): never silently constant gradients."""
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    expected, = torch.autograd.grad((ring_attention(q, k, v, causal=True) ** 2).sum(), q)
    for second in (lambda loss: loss.backward(), lambda loss: torch.autograd.grad(loss, q)):
        out = ring_attention(q, k, v, causal=True)
        dq, = torch.autograd.grad((out * out).sum(), q, create_graph=True)
        assert torch.equal(dq.detach(), expected) and dq.requires_grad
        with pytest.raises(RuntimeError, match="ring_attention: its backward is not differentiable"):
            second(dq.square().sum() + q.sum())


def _same_on_every_rank(message: str) -> None:
    """Assert that every rank of the default group got this same message."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages


def case_ranks_disagreeing_raise_alike():
    """fp16 on rank 0 and bf16 on the others (equal element sizes: the check compared only those, and the ring mixed
    the two), a scale given on one rank only, autograd on one rank only: every rank raises the same ValueError
    naming what differs, before any ring step."""
    rank = dist.get_rank()
    q = torch.randn(1, 2, 4, 8, dtype=torch.float16 if rank == 0 else torch.bfloat16)
    with pytest.raises(ValueError, match="ranks disagree on dtype ") as error:
        ring_attention(q, q, q)
    assert "rank 0: dtype torch.float16; rank 1: dtype torch.bfloat16" in str(error.value)
    _same_on_every_rank(str(error.value))
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="ranks disagree on softmax scale "):
        ring_attention(x, x, x, scale=0.5 if rank == 0 else None)
    with pytest.raises(ValueError, match="ranks disagree on backward "):
        ring_attention(x.clone().requires_grad_(rank == 0), x, x)


def case_unshard_of_unequal_shards_raises_alike():
    """Shards of different lengths or dtypes: every rank raises the same ValueError (gloo aborted one process and
    the other read uninitialised memory); a bad dim on one rank: its own error there, the others name that rank."""
    rank = dist.get_rank()
    with pytest.raises(ValueError, match="ranks disagree on shape ") as error:
        unshard(torch.zeros(1, 1, 2 * (rank + 1), 3))
    _same_on_every_rank(str(error.value))
    with pytest.raises(ValueError, match="ranks disagree on dtype "):
        unshard(torch.zeros(2, dtype=torch.int64 if rank == 0 else torch.float32), 0)
    with pytest.raises(ValueError, match="dim must be in" if rank == 1 else "rank 1 failed its input check"):
        unshard(torch.zeros(4, 2), 5 if rank == 1 else 0)
    # and the collectives still line up afterwards
    assert torch.equal(unshard(torch.full((2,), rank), 0, "contiguous"), torch.tensor([0, 0, 1, 1]))


def case_one_rank_failing_its_input_check_stops_every_rank():
    """A rank whose own inputs are bad raises its own error, and the others a ValueError naming it, at once (they
    waited in the ring until the process group's timeout)."""
    rank = dist.get_rank()
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 16) if rank == 1 else q
    with pytest.raises(ValueError, match="head dim 8 like q" if rank == 1 else "rank 1 failed its input check"):
        ring_attention(q, k, k)
    with pytest.raises(ValueError, match="layout must be" if rank == 1 else "rank 1 failed its input check"):
        ring_attention(q, q, q, layout="striped" if rank == 1 else "zigzag")
    with pytest.raises(TypeError if rank == 0 else ValueError, match="q must be a torch.Tensor" if rank == 0
                       else "layout must be"):  # both fail: each its own error
        ring_attention(q.numpy() if rank == 0 else q, q, q, layout="zigzag" if rank == 0 else "striped")
    assert ring_attention(q, q, q).shape == q.shape


def case_group_without_this_rank_is_a_clear_error():
    """Collectives on a group this process is not in return without touching their tensors: a ValueError instead."""
    only_rank_0 = dist.new_group([0])
    x = torch.arange(4.0)
    if dist.get_rank() == 0:
        assert torch.equal(unshard(x, 0, "contiguous", group=only_rank_0), x)
        return
    for call in (lambda: ring_attention(x[None, None, :, None], x[None, None, :, None], x[None, None, :, None],
                                        group=only_rank_0),
                 lambda: shard(x, 0, group=only_rank_0), lambda: unshard(x, 0, group=only_rank_0)):
        with pytest.raises(ValueError, match="not a member of group"):
            call()


def case_training_matches_single_process(settings, exact, low):
    """Context-parallel training (zigzag shards, ring attention, all-reduced loss and gradients), against a float64
    single-process run, PyTorch's fp32 run being the noise: the loss of each of the two steps obeys the forward
    rule (the second checks the first update), and every parameter's gradient of the first step the backward rule
    (losses alone would miss a wrong gradient scale: AdamW's step does not depend on it). The second step's
    gradients are not compared: AdamW's first update is about lr * sign(g) for every nonzero g, so a gradient
    entry near 0 whose sign rounding flips moves its parameter by 2 lr, and no multiple of fp32 noise bounds the
    gradients that follow."""
    model, _, losses = train("triton", context_parallel="zigzag", **dict(settings, steps=1))
    for name, p in model.named_parameters():
        assert_close(p.grad, exact["grads"][name], low["grads"][name], BACKWARD, name=f"{name}.grad")
    _, _, losses = train("triton", context_parallel="zigzag", **settings)
    assert_close(torch.tensor(losses), torch.tensor(exact["losses"], dtype=torch.float64),
                 torch.tensor(low["losses"]), FORWARD, name="losses")


def _serve(rank, world, port, tasks, results):
    """A rank of the test group: join it, then run each case sent by the test (its module and name: other test
    modules share these groups), reporting its traceback."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=CASE_TIMEOUT_S))
    try:
        x = torch.randn(1, 1, 4, 8, requires_grad=True)  # the interpreter's first launches are slow: not in a case
        ring_attention(x, x, x, causal=True).sum().backward()
        results.put((rank, "ready"))
        for module, name, kwargs in iter(tasks.get, None):
            torch.manual_seed(0)  # as in a fresh process: a case's numbers do not depend on the cases run before
            try:
                getattr(importlib.import_module(module), name)(**kwargs)
                results.put((rank, None))
            except BaseException:  # noqa: B036  (reported to the test, which fails with it)
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the process group


class _Group:
    """``world`` spawned gloo processes on 127.0.0.1, serving cases until closed."""

    def __init__(self, world: int):
        context = multiprocessing.get_context("spawn")
        self.world, self.results = world, context.Queue()
        self.tasks = [context.Queue() for _ in range(world)]
        port = free_port()
        self.processes = [context.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results),
                                          daemon=True) for r in range(world)]
        for p in self.processes:
            p.start()
        self._collect(START_TIMEOUT_S, "start")

    def _collect(self, timeout: float, what: str) -> dict:
        deadline, outcomes = time.monotonic() + timeout, {}
        while len(outcomes) < self.world:
            try:
                rank, outcome = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{what}: ranks {sorted(set(range(self.world)) - set(outcomes))} gave no answer "
                                   f"within {timeout:.0f} s") from None
            outcomes[rank] = outcome
        return outcomes

    def run(self, case, timeout: float = CASE_TIMEOUT_S, **kwargs) -> None:
        for tasks in self.tasks:
            tasks.put((case.__module__, case.__name__, kwargs))
        failures = {r: e for r, e in self._collect(timeout, case.__name__).items() if e is not None}
        if failures:
            pytest.fail("\n".join(f"rank {r}:\n{e}" for r, e in sorted(failures.items())), pytrace=False)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# -------------------------------------------------------------------------------------------- the tests

CASES = [  # (world, layout, causal, dtype, B, H, Hkv, N, D): odd head dims, GQA, chunks of odd length
    (2, "zigzag", True, FP32, 1, 4, 2, 28, 20),
    (2, "contiguous", True, FP32, 2, 3, 1, 14, 20),
    (2, "zigzag", False, FP32, 1, 2, 2, 12, 33),
    (2, "contiguous", False, FP32, 1, 3, 3, 10, 16),
    (2, "zigzag", True, FP16, 1, 2, 1, 20, 24),
]
SLOW_CASES = [  # the default run's ring of more than two ranks is test_distributed_audit's three
    (4, "zigzag", True, FP32, 1, 2, 1, 24, 20),
    (4, "contiguous", True, FP32, 1, 2, 1, 12, 20),
    (4, "zigzag", False, FP16, 2, 4, 1, 40, 48),
    (4, "contiguous", True, FP16, 1, 3, 1, 36, 80),
]


@pytest.mark.parametrize("world,layout,causal,dtype,b,h,h_kv,n,d",
                         CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES])
def test_ring_attention_matches_single_process(groups, world, layout, causal, dtype, b, h, h_kv, n, d):
    """The references run here, once; the ranks shard them."""
    q = torch.randn(b, h, n, d, dtype=dtype)
    k, v = (torch.randn(b, h_kv, n, d, dtype=dtype) for _ in range(2))
    inputs = (q, k, v, torch.randn(q.shape, dtype=dtype), torch.randn(b, h, n))
    scale = 0.3 if d == 33 else None
    groups(world).run(case_matches_single_process, layout=layout, causal=causal, scale=scale, inputs=inputs,
                      expected=_single_process(causal, scale, *inputs), repeat=causal and layout == "zigzag")


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 3: test_distributed_audit
def test_shard_unshard_round_trip(groups, world):
    groups(world).run(case_shard_round_trip)


def test_bad_inputs_raise_on_every_rank(groups):
    groups(2).run(case_bad_inputs_raise)


def test_double_backward_raises_on_every_rank(groups):
    groups(2).run(case_double_backward_raises)


AGREEMENT_TIMEOUT_S = 30  # far below the gloo timeout: a rank left waiting in a collective fails the test


@pytest.mark.parametrize("case", [case_ranks_disagreeing_raise_alike, case_unshard_of_unequal_shards_raises_alike,
                                  case_one_rank_failing_its_input_check_stops_every_rank,
                                  case_group_without_this_rank_is_a_clear_error])
def test_ranks_raise_together(groups, case):
    groups(2).run(case, timeout=AGREEMENT_TIMEOUT_S)


def test_chunks_of_checks_the_rank():
    with pytest.raises(ValueError, match=r"rank must be in \[0, world\) = \[0, 2\), got 2"):
        distributed.chunks_of("zigzag", 2, 2)


TRAIN_SETTINGS = dict(steps=2, batch_size=2, seed=3, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      progress=False)


def test_context_parallel_training_matches_single_process(groups):
    """2 ranks train on zigzag shards; their losses and gradients match a single-process float64 run (reference
    backend)."""
    def run(dtype):
        model, _, _ = train("reference", dtype=dtype, **dict(TRAIN_SETTINGS, steps=1))
        _, _, losses = train("reference", dtype=dtype, **TRAIN_SETTINGS)
        return {"losses": losses, "grads": {name: p.grad for name, p in model.named_parameters()}}

    exact, low = run(torch.float64), run(torch.float32)
    assert exact["losses"][-1] < exact["losses"][0]  # it learns: the second step's loss checks the first update
    groups(2).run(case_training_matches_single_process, timeout=2 * CASE_TIMEOUT_S, settings=TRAIN_SETTINGS,
                  exact=exact, low=low)


@pytest.mark.slow
def test_train_command_under_torchrun():
    """``torchrun --nproc-per-node 2 -m transformer.train --context-parallel`` on CPU: gloo, one loss line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "transformer.train", "--context-parallel", "--steps", "2",
               "--batch-size", "2", "--block-size", "16", "--n-layer", "1", "--sample", "0", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loss: first step") == 1, done.stdout  # rank 0 alone prints


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    q = torch.randn(1, 1, 4, 8)
    for call in (lambda: ring_attention(q, q, q), lambda: shard(q), lambda: unshard(q)):
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()


def _positions(layout: str, rank: int, world: int, size: int) -> torch.Tensor:
    """Global positions of a rank's shard, in its local order."""
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in distributed.chunks_of(layout, rank, world)])


@pytest.mark.parametrize("world,n_local", [(1, 6), (2, 6), (3, 10), (4, 8)])
def test_ring_plans_cover_exactly_the_visible_pairs(world, n_local):
    """Per rank, the blocks of all steps touch each visible (query, key) pair once and no invisible one, and
    every block row sees a key; causal zigzag gives every rank the same count, causal contiguous gives rank r r
    full shards plus a triangle (the last rank about twice the mean)."""
    n = n_local * world
    for layout in ("contiguous", "zigzag"):
        size = n_local // len(distributed.chunks_of(layout, 0, world))
        for causal in (False, True):
            counts = []
            for rank in range(world):
                q_pos, seen = _positions(layout, rank, world, size), torch.zeros(n, n, dtype=torch.int64)
                for t, blocks in enumerate(ring_plans(layout, rank, world, n_local, causal)):
                    k_pos = _positions(layout, (rank - t) % world, world, size)
                    for blk in blocks:
                        rows, keys = torch.arange(blk.q_hi - blk.q_lo)[:, None], torch.arange(blk.k_hi)[None]
                        visible = keys <= rows + blk.shift if blk.causal else (rows >= 0) & (keys >= 0)
                        assert visible.any(1).all(), "a block with a query row that sees nothing"
                        qi, kj = visible.nonzero(as_tuple=True)
                        seen.index_put_((q_pos[blk.q_lo + qi], k_pos[kj]), torch.ones_like(qi), accumulate=True)
                        assert blk.pairs() == len(qi)
                expected = torch.zeros(n, n, dtype=torch.int64)
                expected[q_pos] = 1
                if causal:
                    expected = expected.tril()
                assert torch.equal(seen, expected), (layout, causal, rank)
                counts.append(int(seen.sum()))
            assert sum(counts) == (n * (n + 1) // 2 if causal else n * n)
            if causal and layout == "zigzag":
                assert len(set(counts)) == 1
            if causal and layout == "contiguous":  # rank r: r earlier shards in full, then its own triangle
                assert counts == [n_local * n_local * r + n_local * (n_local + 1) // 2 for r in range(world)]


def test_zigzag_runs_one_call_per_ring_step():
    """The zigzag plan of every step is a single attention call (the diagonal step one causal call)."""
    for rank in range(4):
        plans = ring_plans("zigzag", rank, 4, 6, True)
        assert plans[0] == [Block(0, 6, 6, True, 0)]
        assert all(len(blocks) == 1 for blocks in plans)
    assert plan((1, 6), (0, 7), 3, True) == [Block(0, 6, 3, False, 0)]  # earlier shard: its first chunk, all rows
    assert plan((1, 6), (2, 5), 3, True) == [Block(3, 6, 6, False, 0)]  # later shard: the last chunk sees both


def test_merge_handles_rows_that_see_no_key():
    """Merging a block into an empty accumulator copies it; rows with lse -inf in both stay 0 and -inf (no NaN);
    two halves merge into the whole row's softmax. lse in the kernels' log2 units."""
    scores, values = torch.randn(1, 1, 3, 6), torch.randn(1, 1, 6, 2)
    scores[0, 0, 2] = float("-inf")  # the last row sees no key at all
    halves = []
    for part in (slice(0, 4), slice(4, 6)):
        s = scores[..., part]
        lse = torch.logsumexp(s, -1) * math.log2(math.e)
        halves.append((torch.nan_to_num(torch.softmax(s, -1)) @ values[..., part, :], lse))
    acc_out, acc_lse = torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), float("-inf"))
    for out, lse in halves:
        distributed._merge(acc_out, acc_lse, slice(0, 3), out, lse)
    whole = torch.nan_to_num(torch.softmax(scores, -1)) @ values
    torch.testing.assert_close(acc_out, whole)
    torch.testing.assert_close(acc_lse, torch.logsumexp(scores, -1) * math.log2(math.e))
    assert acc_out[0, 0, 2].eq(0).all() and torch.isneginf(acc_lse[0, 0, 2])
    assert math.isfinite(acc_out.sum().item())

