"""``python -m benchmarks overhead``: host time per call of every public op, beside torch's op and a minimal op.

A small op's wall time is max(GPU time, host time); this measures the host part. Three providers per op, timed
interleaved in one run (min over repeats: the machine is shared and noisy):

- ``ours``: the public function, forward (inputs requiring grad, as in training), forward+backward, and
  inference (the forward under ``torch.no_grad()``, as generation and evaluation run it);
- ``torch``: torch's own op on the same inputs (``F.layer_norm``, SDPA, ...);
- ``minimal``: a Python ``torch.autograd.Function`` that only allocates its output (and, in backward, its input
  gradients): the floor any Python op with autograd pays.

On CPU every Triton launch is stubbed out (``InterpretedFunction.run`` becomes a no-op, so the interpreter's own
argument handling, which is not ours, is skipped too): outputs are garbage and only our Python path is timed.
On a GPU the kernels run for real on tiny inputs, each round of calls synchronised at its end: wall time.

Writes ``overhead.json`` / ``overhead.csv`` and ``overhead.png`` (ratio to the minimal op) into ``--out``.
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import kernels
from kernels import flash_attn
from benchmarks import plots, records
from benchmarks.device import DeviceInfo, cpu_threads, detect

GOAL_RATIO = 3.0
"""Issue #19's bar on CPU with launches stubbed: every op within 3x the minimal op, forward and forward+backward."""
CONVENTIONS = {
    "op": "the public op timed, named as --ops takes it; provider: ours (the package's function), torch (torch's own "
          "op on the same inputs) or minimal (a Python autograd.Function that only allocates its outputs: the floor "
          "any Python op pays); pass: forward (inputs requiring grad), forward+backward, or inference (the forward "
          "under torch.no_grad()); an op with no backward has its forward only.",
    "us_per_call": "host microseconds per call: the minimum over interleaved rounds of a round's mean. launches: "
                   "stubbed (CPU: every Triton launch a no-op, only the Python path timed) or real (a GPU, tiny "
                   "inputs, each round synchronised at its end: wall time).",
    "x_minimal": "us_per_call over the minimal op's in the same pass; config.goal_x_minimal is the goal (issue #19).",
}
"""What ``overhead.json``'s record fields mean."""


class _Minimal(torch.autograd.Function):
    """The floor: allocate the output in forward and one gradient per differentiable input in backward."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.shapes = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) and t.requires_grad else None
                      for t in inputs]
        return torch.empty_like(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return tuple(None if s is None else torch.empty(s[0], dtype=s[1], device=s[2]) for s in ctx.shapes)


def _minimal(*inputs):
    return _Minimal.apply(*inputs)


Case = Tuple[Callable[[], object], Callable[[], object], Callable[[], object]]
"""(ours, torch's, minimal): each a zero-argument call returning the output (a tensor or a tuple whose first item
is the output)."""


def cases(device: torch.device, dtype: torch.dtype = torch.float16) -> Dict[str, Case]:
    """Every public op on tiny inputs: rows of 1024 (4 rows), attention (1, 2, 16, 64)."""
    torch.manual_seed(0)

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt).requires_grad_()

    x, res = leaf(4, 1024), leaf(4, 1024)
    w, b = leaf(1024), leaf(1024)
    ln, rms = kernels.LayerNorm(1024, device=device, dtype=dtype), kernels.RMSNorm(1024, device=device, dtype=dtype)
    torch_ln, torch_rms = torch.nn.LayerNorm(1024, device=device, dtype=dtype), \
        torch.nn.RMSNorm(1024, device=device, dtype=dtype)
    q, k, v = (leaf(1, 2, 16, 64) for _ in range(3))
    pad = torch.ones(1, 16, dtype=torch.bool, device=device)
    pad[:, -3:] = False
    qf, kf, vf = (leaf(1, 16, 2, 64) for _ in range(3))  # flash-attn's (B, S, H, D)
    packed = [leaf(16, 2, 64) for _ in range(3)]
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)
    k_cache, v_cache = (torch.randn(2, 64, 2, 64, device=device, dtype=dtype) for _ in range(2))
    q_dec = torch.randn(2, 1, 2, 64, device=device, dtype=dtype)
    seqlens = torch.tensor([17, 40], dtype=torch.int32, device=device)
    pages_k, pages_v = (torch.randn(8, 16, 2, 64, device=device, dtype=dtype) for _ in range(2))
    table = torch.arange(8, dtype=torch.int32, device=device).reshape(2, 4)

    def torch_decode():
        return F.scaled_dot_product_attention(q_dec.transpose(1, 2), k_cache.transpose(1, 2),
                                              v_cache.transpose(1, 2))

    return {
        "softmax": (lambda: kernels.softmax(x), lambda: torch.softmax(x, -1), lambda: _minimal(x)),
        "log_softmax": (lambda: kernels.log_softmax(x), lambda: torch.log_softmax(x, -1), lambda: _minimal(x)),
        "layer_norm": (lambda: kernels.layer_norm(x, 1024, w, b), lambda: F.layer_norm(x, (1024,), w, b),
                       lambda: _minimal(x, w, b)),
        "rms_norm": (lambda: kernels.rms_norm(x, 1024, w), lambda: F.rms_norm(x, (1024,), w),
                     lambda: _minimal(x, w)),
        "add_layer_norm": (lambda: kernels.add_layer_norm(x, res, 1024, w, b),
                           lambda: F.layer_norm(x + res, (1024,), w, b), lambda: _minimal(x, res, w, b)),
        "add_rms_norm": (lambda: kernels.add_rms_norm(x, res, 1024, w),
                         lambda: F.rms_norm(x + res, (1024,), w), lambda: _minimal(x, res, w)),
        "LayerNorm module": (lambda: ln(x), lambda: torch_ln(x), lambda: _minimal(x, ln.weight, ln.bias)),
        "RMSNorm module": (lambda: rms(x), lambda: torch_rms(x), lambda: _minimal(x, rms.weight)),
        "attention": (lambda: kernels.attention(q, k, v, causal=True),
                      lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: _minimal(q, k, v)),
        "attention key_padding_mask": (
            lambda: kernels.attention(q, k, v, key_padding_mask=pad),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :]),
            lambda: _minimal(q, k, v)),
        "attention window+softcap": (
            lambda: kernels.attention(q, k, v, causal=True, window_size=(8, 0), softcap=30.0),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: _minimal(q, k, v)),
        "attention_varlen": (
            lambda: kernels.attention_varlen(*packed, cu, cu, 11, 11, causal=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: _minimal(*packed)),
        "attention_with_kvcache": (
            lambda: kernels.attention_with_kvcache(q_dec, k_cache, v_cache, cache_seqlens=seqlens),
            torch_decode, lambda: _minimal(q_dec, k_cache, v_cache)),
        "attention_with_kvcache paged": (
            lambda: kernels.attention_with_kvcache(q_dec, pages_k, pages_v, cache_seqlens=seqlens,
                                                   block_table=table),
            torch_decode, lambda: _minimal(q_dec, pages_k, pages_v)),
        "flash_attn_func": (lambda: flash_attn.flash_attn_func(qf, kf, vf, causal=True),
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                            lambda: _minimal(qf, kf, vf)),
        "scaled_dot_product_attention": (
            lambda: kernels.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: _minimal(q, k, v)),
    }


def _output(result):
    return result[0] if isinstance(result, tuple) else result


PASSES = ("forward", "forward+backward", "inference")


def _passes(call: Callable[[], object]) -> Tuple[str, ...]:
    """Every pass, or the forward alone for an op whose output needs no grad (decoding: no backward, and its
    forward already records no graph, so an inference pass would time it again under another name)."""
    return PASSES if _output(call()).requires_grad else PASSES[:1]


def _timed(call: Callable[[], object], passes: str) -> Callable[[], object]:
    """The call that times ``passes`` of ``call``."""
    if passes == "forward":
        return call
    if passes == "inference":
        def run():
            with torch.no_grad():
                return call()
        return run
    return _with_backward(call)


def _with_backward(call: Callable[[], object]) -> Callable[[], object]:
    """forward then backward of the output against a ones gradient (made once), or forward only where the output
    needs no grad (decoding)."""
    grad = {}

    def run():
        out = _output(call())
        if out.requires_grad:
            if "g" not in grad:
                grad["g"] = torch.ones_like(out)
            out.backward(grad["g"])
    return run


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every interpreted Triton launch becomes a no-op inside the block (CPU only): only the host path is left."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = original


def time_call(call: Callable[[], object], device: torch.device, calls: int) -> float:
    """µs per call over ``calls`` calls, synchronised at the end on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def measure(device: DeviceInfo, names: Optional[Sequence[str]] = None, repeats: int = 7,
            calls: int = 50) -> List[dict]:
    """One record per (op, provider, pass): min µs per call over ``repeats`` interleaved rounds, and the ratio to
    the minimal op of the same pass (forward only for an op with no backward)."""
    dev = device.torch_device
    table = cases(dev)
    names = list(names or table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {list(table)}")
    providers = ("ours", "torch", "minimal")
    best: Dict[tuple, float] = {}
    stub = stubbed_launches() if dev.type == "cpu" else contextlib.nullcontext()
    with stub:
        passes_of = {name: _passes(table[name][0]) for name in names}
        calls_of = {(name, provider, passes): _timed(fn, passes)
                    for name in names for provider, fn in zip(providers, table[name]) for passes in passes_of[name]}
        for key, call in calls_of.items():  # warm-up: plan caches, autotuning and compiles out of the timing
            call()
            call()
        for _ in range(repeats):
            for key, call in calls_of.items():
                us = time_call(call, dev, calls)
                best[key] = min(best.get(key, float("inf")), us)
    recs = []
    for (name, provider, passes), us in best.items():
        floor = best[(name, "minimal", passes)]
        recs.append({"op": name, "provider": provider, "pass": passes, "us_per_call": round(us, 2),
                     "x_minimal": round(us / floor, 2), "launches": "stubbed" if dev.type == "cpu" else "real"})
    return recs


def format_table(recs: List[dict]) -> str:
    """One line per op and pass: ours / torch / minimal µs and ours' ratio to the minimal op."""
    by = {(r["op"], r["provider"], r["pass"]): r for r in recs}
    ops = list(dict.fromkeys(r["op"] for r in recs))
    lines = [f"{'op':30} {'pass':17} {'ours µs':>9} {'torch µs':>9} {'minimal µs':>10} {'ours/minimal':>12}"]
    for op in ops:
        for passes in PASSES:
            if (op, "ours", passes) not in by:  # no backward
                continue
            ours, torch_, floor = (by[(op, p, passes)] for p in ("ours", "torch", "minimal"))
            flag = "" if ours["x_minimal"] <= GOAL_RATIO else "  > goal"
            lines.append(f"{op:30} {passes:17} {ours['us_per_call']:9.1f} {torch_['us_per_call']:9.1f} "
                         f"{floor['us_per_call']:10.1f} {ours['x_minimal']:11.2f}x{flag}")
    return "\n".join(lines)


def plot(recs: List[dict], device: DeviceInfo, out: str) -> List[str]:
    """A bar chart of ours' and torch's time over the minimal op's, per op and pass: [png], or [] without
    matplotlib."""
    if not plots.have_pyplot():
        return []
    plt = plots.plt
    ops = list(dict.fromkeys(r["op"] for r in recs))
    by = {(r["op"], r["provider"], r["pass"]): r["x_minimal"] for r in recs}
    fig, axes = plt.subplots(1, len(PASSES), figsize=(18, 0.35 * len(ops) + 2), sharey=True)
    for ax, passes in zip(axes, PASSES):
        ys = range(len(ops))  # an op with no backward has bars in the forward panel only
        ax.barh([y + 0.2 for y in ys], [by.get((op, "ours", passes), 0) for op in ops], 0.4, label="ours")
        ax.barh([y - 0.2 for y in ys], [by.get((op, "torch", passes), 0) for op in ops], 0.4, label="torch")
        ax.axvline(GOAL_RATIO, color="red", linestyle="--", label=f"goal ({GOAL_RATIO:g}x)")
        ax.set_yticks(list(ys), ops)
        ax.set_xlabel("host time / minimal autograd op")
        ax.set_title(passes)
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    launches = "Triton launches stubbed (CPU host path only)" if device.kind == "cpu" else "wall time, tiny inputs"
    fig.suptitle(f"Host overhead per call on {device.name}: {launches}")
    return plots.save(fig, os.path.join(out, "overhead.png"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default="results", help="folder for overhead.json/.csv/.png")
    parser.add_argument("--ops", nargs="+", metavar="OP", choices=list(cases(torch.device("meta"))),
                        help="only these ops (names as printed, quoted where they hold a space: %(choices)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and calls (a CI-sized run)")
    args = parser.parse_args(argv)
    device = detect()
    launches = "Triton launches stubbed: host path only" if device.kind == "cpu" else "real launches, wall time"
    print(f"device: {device.name}  ({launches})", flush=True)
    with cpu_threads(device, 1):  # tiny ops: extra threads only add noise on a shared machine
        recs = measure(device, args.ops, repeats=3 if args.quick else 7, calls=10 if args.quick else 50)
    records.report(args.out, "overhead", device, {**vars(args), "command": "overhead", "goal_x_minimal": GOAL_RATIO},
                   recs, format_table(recs), plot, conventions=CONVENTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
