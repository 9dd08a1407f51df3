"""Context parallelism: ring attention over ``torch.distributed``.

A sequence of length N is split along its positions over the P ranks of a process group, N_local = N / P each, in
one of two layouts:

- ``"contiguous"``: rank r holds positions [r * N_local, (r + 1) * N_local).
- ``"zigzag"``: the sequence is cut into 2P chunks of N_local / 2 and rank r holds chunks r and 2P - 1 - r,
  concatenated. Under a causal mask every rank then sees the same number of (query, key) pairs, where the
  contiguous layout gives the last rank about twice the mean.

:func:`ring_attention` passes each rank's K/V shard around the ring (P - 1 hops, each posted before the block that
uses the current shard is computed, so transfer overlaps compute on GPUs) and merges the per-block outputs with
their logsumexps in fp32. Its backward passes K/V around again with an fp32 dK/dV accumulator travelling with them,
which arrives back at its owner after P hops; every sum is taken in a fixed order, so results are deterministic.
Only ``kernels.attention``'s launches compute: ``attention_forward`` for (out, lse) of a block and
``attention_backward`` for a block's exact gradients given the global (out, lse), with lse in the kernels' log2
units throughout (converted to the natural log only when returned).
"""
import numbers
import struct
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from kernels import _runtime
from kernels._autograd import first_order_only
from kernels._validate import DimError, check_tensor, refuse_dtensor
from kernels.attention.checks import check_flag, check_qkv, check_scale
from kernels.attention.ops import attention_backward, attention_forward, natural_lse
from kernels.attention.plan import NO_TENSORS, AttentionVariant

LAYOUTS = ("contiguous", "zigzag")
_KV_TAG, _GRAD_TAG = 0, 2  # distinct tags for the K/V and dK/dV messages that are in flight to one peer at once


# ------------------------------------------------------------------------------------------------- layouts


def _check_group(group, what: str) -> None:
    """RuntimeError without a process group, TypeError for a ``group`` that is not a ProcessGroup, ValueError if this process is
    not one of its members (collectives on it would return without touching their tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{what}: this process is not a member of group (torch.distributed.new_group returned "
                         "GroupMember.NON_GROUP_MEMBER to it)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{what}: this process is not a member of group")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunks_of(layout: str, rank: int, world: int) -> Tuple[int, ...]:
    """Indices, in order, of the equal chunks of the sequence that ``rank`` holds: the sequence has ``world``
    chunks in the contiguous layout and ``2 * world`` in the zigzag one. Always ascending."""
    _check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) = [0, {world}), got {rank}")
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def _pieces(length: int, layout: str, world: int, name: str, local: bool = False) -> int:
    """The chunk length of a sequence of ``length`` positions; ValueError naming ``name`` if it does not split
    (``local``: ``name`` holds one rank's length / world positions, and the message speaks of those)."""
    count = world * (1 if layout == "contiguous" else 2)
    if length % count:
        if local:  # only zigzag can fail here: each rank holds 2 chunks
            raise ValueError(f"{name}: {length // world} positions per rank do not split into the zigzag layout's "
                             f"2 equal chunks per rank (N_local must be even; {length} over {world} ranks)")
        raise ValueError(f"{name}: a sequence of length {length} does not split into {count} equal chunks for the "
                         f"{layout} layout over {world} ranks")
    return length // count


def _rank_and_world(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _check_dim(dim, x: torch.Tensor, name: str) -> int:
    """``dim`` as an index in [0, x.dim()); TypeError/ValueError naming it and ``name``'s shape otherwise."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise DimError(f"dim must be in [-{x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, got {dim}")
    return int(dim) % x.dim()


# ------------------------------------------------------------------------------------- cross-rank agreement


class _Codec(NamedTuple):
    """A fact's fixed number of int64 slots in the agreement tensor, and the conversions to and from them."""
    slots: int
    encode: Callable[[object], List[int]]
    decode: Callable[[List[int]], object]


def _encode_text(text: str, slots: int) -> List[int]:
    raw = text.encode().ljust(8 * slots, b"\0")
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def _decode_text(slots: List[int]) -> str:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in slots).rstrip(b"\0").decode()


_MAX_DIMS = 25  # the shape slots of unshard's agreement, which is one fixed-size tensor on every rank
_INT = _Codec(1, lambda value: [int(value)], lambda slots: slots[0])
_FLAG = _Codec(1, lambda value: [int(bool(value))], lambda slots: bool(slots[0]))
_TEXT = _Codec(4, lambda value: _encode_text(str(value), 4), _decode_text)
_REAL = _Codec(1, lambda value: list(struct.unpack("<q", struct.pack("<d", value))),  # its bits: compared exactly
               lambda slots: struct.unpack("<d", struct.pack("<q", slots[0]))[0])
_SHAPE = _Codec(1 + _MAX_DIMS, lambda shape: [len(shape), *shape, *[-1] * (_MAX_DIMS - len(shape))],
                lambda slots: tuple(slots[1:1 + slots[0]]))
_Schema = Sequence[Tuple[str, _Codec]]


def _encode(schema: _Schema, facts: Dict[str, object]) -> List[int]:
    """The facts' slots, in schema order; ValueError for a fact that does not fit its slots (every rank's row must
    have the schema's length, or the all_gather would mix them up)."""
    row = []
    for name, codec in schema:
        slots = codec.encode(facts[name])
        if len(slots) != codec.slots:
            raise ValueError(f"{name} {facts[name]!r} does not fit the {codec.slots} int64 slots a rank announces")
        row += slots
    return row


def _fields(schema: _Schema, row: List[int]) -> Dict[str, Tuple[List[int], object]]:
    """name -> (the fact's slots in ``row``, its decoded value)."""
    fields, start = {}, 0
    for name, codec in schema:
        slots = row[start:start + codec.slots]
        fields[name], start = (slots, codec.decode(slots)), start + codec.slots
    return fields


def _collective_device(group, like) -> torch.device:
    """Where the group's collectives take a small tensor: every backend but NCCL CPU ones; NCCL only CUDA ones, on
    the device of ``like`` (the caller's tensor) where it is one: a script that puts its tensors on cuda:LOCAL_RANK
    without torch.cuda.set_device would otherwise gather every rank's on cuda:0, the current device that
    torch.distributed's object collectives use."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.is_cuda:
        return like.device
    return torch.device("cuda", torch.cuda.current_device())


def _agree(what: str, group, schema: _Schema, local_facts: Callable[[], Dict[str, object]],
           like) -> Dict[str, object]:
    """``local_facts()`` of this rank once every rank of ``group`` has checked its own inputs and all found the
    same facts; otherwise every rank raises at once: a rank whose ``local_facts`` raised its own error, the others
    a ValueError naming the failed ranks, or, all having passed, every rank the same ValueError naming the facts
    that differ and each rank's values.

    Every rank must call this before its first transfer, so that no rank waits in a collective that a failed or
    disagreeing rank never joins (until the process group's timeout, 30 minutes by default), nor gathers tensors
    of another size (gloo aborts the process, others return uninitialised memory). It is ONE all_gather of a
    small int64 tensor per call, whose result the host reads: one device sync per call, the price of raising
    on every rank together. ``like``: the caller's tensor, whose device an NCCL group gathers on.
    """
    try:
        facts, error = local_facts(), None
        row = [1, *_encode(schema, facts)]
    except Exception as local_error:  # noqa: BLE001  (re-raised below, once the other ranks know)
        error = local_error
        row = [0] * (1 + sum(codec.slots for _, codec in schema))
    mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(group, like))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).tolist()
    failed = [rank for rank, (ok, *_) in enumerate(rows) if not ok]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{what}: rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed "
                         "its input check (its own error says why); no rank went on")
    fields = [_fields(schema, r[1:]) for r in rows]
    differ = [name for name, _ in schema if any(f[name][0] != fields[0][name][0] for f in fields)]
    if differ:
        described = "; ".join(f"rank {rank}: " + ", ".join(f"{name} {f[name][1]}" for name in differ)
                              for rank, f in enumerate(fields))
        raise ValueError(f"{what}: the ranks disagree on {', '.join(differ)} ({described}); every rank must pass "
                         "the same")
    return facts


# -------------------------------------------------------------------------------------------- shard/unshard


def shard(x: torch.Tensor, dim: int = 2, layout: str = "zigzag", group=None) -> torch.Tensor:
    """This rank's shard (a copy) of the full tensor ``x`` along ``dim`` (the sequence: 2 for (B, H, N, D)).

    ``x.shape[dim]`` must split into P (contiguous) or 2P (zigzag) equal chunks, P the group's size. Local: it
    communicates nothing (so it cannot wait on another rank), and each rank's shard follows from its own
    arguments; ranks that pass different shapes are caught by :func:`ring_attention` and :func:`unshard`.
    """
    _check_group(group, "shard")
    _check_layout(layout)
    check_tensor("x", x, dtypes=None)
    refuse_dtensor("x", x, "the whole tensor, x.full_tensor()")
    dim = _check_dim(dim, x, "x")
    rank, world = _rank_and_world(group)
    size = _pieces(x.shape[dim], layout, world, "x")
    return torch.cat([x.narrow(dim, c * size, size) for c in chunks_of(layout, rank, world)], dim)


_UNSHARD_SCHEMA = (("shape", _SHAPE), ("dim", _INT), ("dtype", _TEXT), ("device type", _TEXT), ("layout", _TEXT))


def _unshard_facts(x_local, dim, layout: str, world: int) -> Dict[str, object]:
    """What every rank's unshard must agree on; TypeError/ValueError naming the argument if its own are bad."""
    _check_layout(layout)
    check_tensor("x_local", x_local, dtypes=None)
    refuse_dtensor("x_local", x_local, "this rank's shard, x_local.to_local()")
    dim = _check_dim(dim, x_local, "x_local")
    if x_local.dim() > _MAX_DIMS:
        raise ValueError(f"x_local: unshard gathers tensors of at most {_MAX_DIMS} dims, got shape "
                         f"{tuple(x_local.shape)}")
    _pieces(x_local.shape[dim] * world, layout, world, "x_local", local=True)
    return {"shape": tuple(x_local.shape), "dim": dim, "dtype": x_local.dtype, "device type": x_local.device.type,
            "layout": layout}


def unshard(x_local: torch.Tensor, dim: int = 2, layout: str = "zigzag", group=None) -> torch.Tensor:
    """The full tensor from every rank's shard along ``dim``: an all_gather, then the chunks put back in sequence
    order. The inverse of :func:`shard`; not differentiable (the gathered tensor has no grad_fn). Every rank
    must pass a shard of the same shape, dtype and device type, with the same ``dim`` and ``layout``: otherwise
    every rank raises the same ValueError (checked with one small all_gather before the data's)."""
    _check_group(group, "unshard")
    world = dist.get_world_size(group)
    dim = _agree("unshard", group, _UNSHARD_SCHEMA, lambda: _unshard_facts(x_local, dim, layout, world),
                 x_local)["dim"]
    size = _pieces(x_local.shape[dim] * world, layout, world, "x_local", local=True)
    x_local = x_local.contiguous()
    gathered = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(gathered, x_local, group=group)
    pieces = {}
    for r, part in enumerate(gathered):
        for i, c in enumerate(chunks_of(layout, r, world)):
            pieces[c] = part.narrow(dim, i * size, size)
    return torch.cat([pieces[c] for c in sorted(pieces)], dim)


# ---------------------------------------------------------------------------------------------- block plans


class Block(NamedTuple):
    """One attention call of a ring step: local query rows [q_lo, q_hi) against local keys [0, k_hi); with
    ``causal``, query row i (counted from q_lo) sees key j iff j <= i + shift (the ops' ``causal_shift``)."""
    q_lo: int
    q_hi: int
    k_hi: int
    causal: bool
    shift: int

    def pairs(self) -> int:
        """The number of visible (query, key) pairs: what the block's FLOPs are proportional to."""
        rows, keys = self.q_hi - self.q_lo, self.k_hi
        if not self.causal:
            return rows * keys
        return sum(min(keys, max(0, i + self.shift + 1)) for i in range(rows))


def plan(q_chunks: Sequence[int], kv_chunks: Sequence[int], size: int, causal: bool) -> List[Block]:
    """The attention calls between a query shard holding ``q_chunks`` and a K/V shard holding ``kv_chunks``
    (ascending chunk indices, ``size`` positions each), as few as the visibility allows.

    Without ``causal`` every pair is visible: one call. With it, a query chunk sees the key chunks before it in
    full (a prefix of the ascending ``kv_chunks``) and its own chunk causally (the diagonal, shift 0), and no
    later one; so each query chunk is one call on a key prefix, and consecutive query chunks whose calls line up
    (the same prefix without a diagonal, or diagonals one chunk apart) merge into one. No call touches a pair
    that no query can see.
    """
    if not causal:
        return [Block(0, len(q_chunks) * size, len(kv_chunks) * size, False, 0)]
    blocks: List[Block] = []
    for i, qc in enumerate(q_chunks):
        full = sum(kc < qc for kc in kv_chunks)
        diagonal = qc in kv_chunks
        if not (full or diagonal):
            continue
        row = Block(i * size, (i + 1) * size, (full + diagonal) * size, diagonal, full * size if diagonal else 0)
        last = blocks[-1] if blocks else None
        if last and last.q_hi == row.q_lo and last.causal == row.causal and (
                row.shift == last.shift + (last.q_hi - last.q_lo) if row.causal else row.k_hi == last.k_hi):
            blocks[-1] = last._replace(q_hi=row.q_hi, k_hi=max(last.k_hi, row.k_hi))
        else:
            blocks.append(row)
    return blocks


def ring_plans(layout: str, rank: int, world: int, n_local: int, causal: bool) -> List[List[Block]]:
    """The blocks ``rank`` computes at each ring step t = 0 .. P-1, where it holds the K/V shard of rank
    (rank - t) mod P."""
    size = _pieces(n_local * world, layout, world, "q", local=True)
    mine = chunks_of(layout, rank, world)
    return [plan(mine, chunks_of(layout, (rank - t) % world, world), size, causal) for t in range(world)]


# ------------------------------------------------------------------------------------------------ the ring


class _Ring:
    """Point-to-point exchange with the ring's neighbours: send to rank + 1, receive from rank - 1."""

    def __init__(self, group):
        self.group = group
        rank, self.world = _rank_and_world(group)
        global_rank = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = global_rank((rank + 1) % self.world), global_rank((rank - 1) % self.world)

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int):
        """Post the sends of ``tensors`` and the receives of same-shaped ones at once (before the caller's
        compute, so they overlap it); returns a function that waits and gives the received tensors."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(received)]
        requests = dist.batch_isend_irecv(ops)

        def wait() -> List[torch.Tensor]:
            for request in requests:  # the sends too: their buffers must outlive the transfer
                request.wait()
            return received
        return wait


def _merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
    """acc <- the softmax-weighted union of acc and one block's (out, lse) on ``rows``, in fp32 and in the kernels'
    log2 units: lse' = logaddexp2(lse_acc, lse), out' = 2^(lse_acc - lse') out_acc + 2^(lse - lse') out.
    Rows that have seen no key yet (lse' = -inf) keep out 0 and lse -inf instead of NaN."""
    old_lse = acc_lse[..., rows]
    new_lse = torch.logaddexp2(old_lse, lse)
    finite = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    acc_out[..., rows, :] = (acc_out[..., rows, :] * torch.exp2(old_lse - finite).unsqueeze(-1)
                             + out.float() * torch.exp2(lse - finite).unsqueeze(-1))
    acc_lse[..., rows] = new_lse


def _ring_forward(q, k, v, plans, scale: float, ring: _Ring):
    """(out in q's dtype, lse fp32 in log2 units) of this rank's queries against the whole ring's keys."""
    acc_out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    kv = (k, v)
    for t, blocks in enumerate(plans):
        arriving = ring.exchange(kv, _KV_TAG) if t < len(plans) - 1 else None
        for b in blocks:
            rows = slice(b.q_lo, b.q_hi)
            out, lse = attention_forward(q[:, :, rows], kv[0][:, :, :b.k_hi], kv[1][:, :, :b.k_hi], NO_TENSORS,
                                         AttentionVariant(causal=b.causal, causal_shift=b.shift, scale=scale))
            _merge(acc_out, acc_lse, rows, out, lse)
        if arriving is not None:
            kv = arriving()
    return acc_out.to(q.dtype), acc_lse


def _ring_backward(grad_out, grad_lse, q, k, v, out, lse, plans, scale: float, ring: _Ring):
    """(dq, dk, dv) of this rank's shards: each step adds its blocks' gradients to dq and to the dK/dV accumulator
    of the K/V shard it holds, which then moves on with that shard and reaches its owner after P hops."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, accumulator = (k, v), None
    for t, blocks in enumerate(plans):
        arriving = ring.exchange(kv, _KV_TAG) if t < len(plans) - 1 else None
        grads = None
        for b in blocks:
            rows = slice(b.q_lo, b.q_hi)
            dq_b, dk_b, dv_b = attention_backward(grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, :b.k_hi],
                                            kv[1][:, :, :b.k_hi], out[:, :, rows], lse[..., rows].contiguous(),
                                            None if grad_lse is None else grad_lse[..., rows].contiguous(),
                                            NO_TENSORS,
                                            AttentionVariant(causal=b.causal, causal_shift=b.shift, scale=scale))
            dq[:, :, rows] += dq_b
            grads = grads or [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]
            grads[0][:, :, :b.k_hi] += dk_b
            grads[1][:, :, :b.k_hi] += dv_b
        if accumulator is not None:  # the ranks before this one, in ring order, then this one: a fixed order
            earlier = accumulator()
            grads = earlier if grads is None else [e + g for e, g in zip(earlier, grads)]
        accumulator = ring.exchange(grads, _GRAD_TAG) if ring.world > 1 else (lambda g=grads: g)
        if arriving is not None:
            kv = arriving()
    dk, dv = accumulator()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, scale, ring):
        out, lse = _ring_forward(q, k, v, plans, scale, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.scale, ctx.ring = plans, scale, ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = _ring_backward(grad_out, grad_lse, q, k, v, out, lse, ctx.plans, ctx.scale, ctx.ring)
        return dq, dk, dv, None, None, None

    backward = staticmethod(first_order_only("ring_attention", _backward.__func__))


_RING_SCHEMA = (("batch", _INT), ("heads", _INT), ("kv heads", _INT), ("positions per rank", _INT),
                ("head dim", _INT), ("dtype", _TEXT), ("device type", _TEXT), ("causal", _FLAG), ("layout", _TEXT),
                ("softmax scale", _REAL), ("backward", _FLAG))


def _ring_facts(q, k, v, causal, scale, layout, return_lse, world: int) -> Dict[str, object]:
    """This rank's checks of its own ring_attention inputs (TypeError/ValueError/NotImplementedError naming the
    argument), and what every rank must agree on: shapes, dtype, device type, causal, layout, the softmax scale,
    and whether autograd will run the backward ring (a rank that does waits for the others' K/V otherwise).
    ``return_lse`` is checked here too (a rank raising after the agreement would leave the others in the ring)
    and returned with the facts, though the ranks need not agree on it."""
    _check_layout(layout)
    causal = check_flag("causal", causal)  # as kernels.attention: bool("False") would be True, bool(None) False
    check_qkv(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):  # a DTensor placed Shard(2) holds the contiguous layout's shard
        refuse_dtensor(name, t, f"this rank's shard, shard({name}.full_tensor(), 2, layout), or {name}.to_local() "
                                 "of a Shard(2) DTensor with layout=\"contiguous\"")
    scale = check_scale(scale, q.shape[-1])
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k, v must hold the same {q.shape[2]} positions as q (this rank's shard of one sequence), "
                         f"got q of shape {tuple(q.shape)} and k of shape {tuple(k.shape)}")
    if not _runtime.kernels_can_run(q, k, v):
        raise ValueError(f"ring_attention: the kernels of this process cannot run on {q.device} tensors "
                         f"({'CPU tensors under the interpreter' if _runtime.INTERPRETED else 'GPU tensors'} needed)")
    _runtime.refuse_forward_ad("ring_attention", q, k, v)
    if _runtime.in_functorch_transform():  # torch raised a "must override setup_context" error, naming nothing
        raise NotImplementedError("ring_attention: torch.func transforms (grad, vjp, jacrev, vmap, ...) are not "
                                  "supported; take its gradients with torch.autograd (backward, autograd.grad)")
    _pieces(q.shape[2] * world, layout, world, "q", local=True)
    (batch, heads, n_local, d), kv_heads = q.shape, k.shape[1]
    return {"batch": batch, "heads": heads, "kv heads": kv_heads, "positions per rank": n_local, "head dim": d,
            "dtype": q.dtype, "device type": q.device.type, "causal": causal, "layout": layout,
            "softmax scale": scale,
            "backward": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            "return_lse": check_flag("return_lse", return_lse)}


@torch.compiler.disable  # a graph break under torch.compile: the ring's transfers and host checks run eagerly
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: Optional[float] = None, *, group=None, layout: str = "zigzag", return_lse: bool = False):
    """This rank's shard of ``kernels.attention(q_full, k_full, v_full, causal, scale)``, differentiable.

    q: (B, H, N_local, D) and k, v: (B, Hkv, N_local, D) are this rank's shards (see :func:`shard`) of sequences
    of N = N_local * P positions in ``layout`` ("zigzag": N_local even; "contiguous"), P = the size of ``group``
    (the default group for None). Head dims and GQA as ``kernels.attention``, dtypes its kernels' (fp16, bf16, fp32;
    not float64, which kernels.attention runs in torch ops); causal is over global positions. Every rank of the
    group must call it with the same shapes, dtype, ``causal``, ``layout`` and ``scale``, and with autograd on or
    off alike: before any ring step the ranks check that with one small all_gather, and if a rank's inputs fail its
    own checks or the ranks disagree, every rank raises at once.
    Returns out (B, H, N_local, D) in q's dtype, and with ``return_lse`` the fp32 natural-log logsumexp
    (B, H, N_local), -inf for rows that see no key. Only the Hkv heads of K/V travel: P - 1 hops of K and V
    forward; backward, P - 1 hops of K/V and P hops of their fp32 gradient accumulators. Under torch.compile it
    is a graph break (it runs eagerly; fullgraph=True refuses it); torch.func transforms raise NotImplementedError.
    A DTensor q, k or v is a TypeError (on every rank, as any failed check): pass this rank's plain shard.
    """
    _check_group(group, "ring_attention")
    rank, world = _rank_and_world(group)
    facts = _agree("ring_attention", group, _RING_SCHEMA,
                   lambda: _ring_facts(q, k, v, causal, scale, layout, return_lse, world), q)
    plans = ring_plans(layout, rank, world, q.shape[2], facts["causal"])
    out, lse = _RingAttention.apply(q, k.contiguous(), v.contiguous(), plans, facts["softmax scale"], _Ring(group))
    return (out, natural_lse(lse)) if facts["return_lse"] else out
