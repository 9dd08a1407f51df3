"""``python -m benchmarks model``: what a drop-in user asks first, how much faster is my model, end to end.

Workloads, each timed for every provider in the same run:

- ``train``: one training step (forward, backward, AdamW step) of the reference GPT at GPT-2 small/medium shapes,
  and of a Hugging Face Llama-architecture model (GQA, RMSNorm) built from a config (no download);
- ``prefill``: the Llama model's forward over a batch of left-padded prompts;
- ``decode``: the Llama model's greedy ``generate()`` with a dynamic and a static cache, batch 1 and 16, after a
  prompt of 1k-16k tokens. Decode time is ``generate(N + 1 tokens) - generate(1 token)``: N steps, no prefill.

Providers: ours (``triton``: the GPT's triton backend, or a ``transformer.patch()``ed model) against torch's
(``torch sdpa``: the GPT's SDPA backend; ``torch reference``: its quadratic baseline; ``hf sdpa`` / ``hf eager``:
transformers' own attention; ``hf flash_attention_2`` where flash-attn is installed), eager and under
``torch.compile`` where it applies (decode: transformers compiles a static cache's step itself on a GPU).

Measures: ms per step, tokens/s, model FLOPs utilisation (nanoGPT's 6N + 12 L H Q T per trained token; 2N + 4 L H Q T
per forward token) and peak memory above the model on a GPU. On CPU (``--threads`` torch threads, default 1) the
Triton providers run in Triton's interpreter: their wall time is the interpreter's, labelled so, never a GPU
figure; the CPU records also carry the bytes a step reads and writes (``benchmarks/counting.py``; decode: one
decoding step, counted generate(2) minus generate(1), the prefill cancelling as in the timing).

``--out DIR`` writes ``model.json`` (records), ``model.csv`` and one PNG per workload.
"""
import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import kernels  # noqa: F401  (first: the interpreter on a machine without a GPU)
from benchmarks import plots, records
from benchmarks.device import DeviceInfo, cpu_threads, detect
from benchmarks.suite import at_least
from transformer.model import GPT, GPTConfig
from transformer.patch import patch


@dataclass(frozen=True)
class Shape:
    """A model and its batch: ``layers``/``heads``/``kv_heads``/``width`` of the model, ``batch`` x ``length`` tokens
    (for decode, ``length`` is the prompt and ``new_tokens`` the decoded ones)."""

    layers: int
    heads: int
    kv_heads: int
    width: int
    batch: int
    length: int
    vocab: int = 50304
    new_tokens: int = 0


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "gpt" or "llama"
    kind: str  # "train", "prefill" or "decode"
    shape: Shape
    cache: str = ""  # decode: "dynamic" or "static"


def workloads(kind: str, quick: bool) -> List[Workload]:
    """GPU: GPT-2 small/medium and a 1B-class Llama; CPU: the same workloads at interpreter-sized shapes."""
    if kind == "cuda":
        small, medium = Shape(12, 12, 12, 768, 8, 1024), Shape(24, 16, 16, 1024, 4, 1024)
        llama = Shape(16, 16, 4, 2048, 4, 1024, vocab=32000)
        prefill = Shape(16, 16, 4, 2048, 8, 2048, vocab=32000)
        decode = [Shape(16, 16, 4, 2048, b, n, vocab=32000, new_tokens=32) for b, n in ((1, 1024), (16, 1024),
                                                                                        (1, 16384), (16, 4096))]
    else:
        small, medium = Shape(2, 2, 2, 32, 1, 16, vocab=96), Shape(3, 4, 4, 64, 2, 32, vocab=96)
        llama = Shape(2, 4, 2, 32, 1, 16, vocab=96)
        prefill = Shape(2, 4, 2, 32, 3, 16, vocab=96)
        decode = [Shape(2, 4, 2, 32, b, 16, vocab=96, new_tokens=8) for b in (1, 2)]
    chosen = [Workload("gpt2-small train", "gpt", "train", small),
              Workload("llama-gqa train", "llama", "train", llama),
              Workload("llama prefill (padded)", "llama", "prefill", prefill)]
    if not quick:
        chosen.insert(1, Workload("gpt2-medium train", "gpt", "train", medium))
    for shape in decode[:2] if quick else decode:
        for cache in ("dynamic", "static"):
            chosen.append(Workload(f"llama decode b{shape.batch} ctx{shape.length} {cache}", "llama", "decode",
                                   shape, cache))
    return chosen


GPT_PROVIDERS = {"triton": "triton", "torch sdpa": "sdpa", "torch reference": "reference"}
"""Provider name -> the GPT's backend."""


def hf_providers() -> Dict[str, Optional[str]]:
    """Provider name -> transformers' attn_implementation (None: ours, through ``patch()``)."""
    providers = {"triton (patch)": None, "hf sdpa": "sdpa", "hf eager": "eager"}
    if importlib.util.find_spec("flash_attn") is not None:
        providers["hf flash_attention_2"] = "flash_attention_2"
    return providers


# ------------------------------------------------------------------------------------------------ models and steps


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (as people train and serve); fp32 on CPU, where the interpreter computes exactly."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gpt(shape: Shape, backend: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=shape.vocab, block_size=max(shape.length, 1), n_layer=shape.layers,
                       n_head=shape.heads, n_kv_head=shape.kv_heads, n_embd=shape.width, bias=False, backend=backend)
    return GPT(config).to(device)


def _llama(shape: Shape, implementation: Optional[str], device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.width, intermediate_size=4 * shape.width,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.length + shape.new_tokens + 8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None,
                         attn_implementation=implementation or "sdpa")
    model = LlamaForCausalLM(config).to(device, _dtype(device))
    return patch(model) if implementation is None else model


def _tokens(shape: Shape, device: torch.device, padded: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention_mask (B, T)): random ids; with ``padded``, row b is left-padded by b * T / (2B)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, shape.vocab, (shape.batch, shape.length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for b in range(shape.batch):
            pad = b * shape.length // (2 * shape.batch)
            ids[b, :pad], mask[b, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def _train_step(model: torch.nn.Module, forward: Callable, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward()
        loss.backward()
        optimizer.step()
    return step


def build(workload: Workload, provider: str, mode: str, device: torch.device) -> Tuple[Callable[[], object], int]:
    """(one timed step, tokens it processes) of ``workload`` for ``provider`` in ``mode``."""
    shape = workload.shape
    if workload.model == "gpt":
        model = _gpt(shape, GPT_PROVIDERS[provider], device)
        ids, _ = _tokens(shape, device, padded=False)
        forward = torch.compile(model) if mode == "compile" else model
        return _train_step(model, lambda: forward(ids, ids)[1], device), ids.numel()
    model = _llama(shape, hf_providers()[provider], device)
    ids, mask = _tokens(shape, device, padded=workload.kind != "train")
    forward = torch.compile(model) if mode == "compile" and workload.kind != "decode" else model
    if workload.kind == "train":
        return _train_step(model, lambda: forward(input_ids=ids, labels=ids).loss, device), ids.numel()
    if workload.kind == "prefill":
        def prefill():
            with torch.no_grad():
                return forward(input_ids=ids, attention_mask=mask).logits
        return prefill, int(mask.sum())

    def generate(new_tokens: int):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, cache_implementation=workload.cache,
                              disable_compile=mode != "compile")
    return generate, shape.batch * shape.new_tokens


def modes(workload: Workload, device: torch.device, quick: bool) -> List[str]:
    """eager always; compile where it applies: training and prefill everywhere (on CPU, the GPT's training step
    only, and not in a quick run), decoding with a static cache on a GPU (transformers compiles its step)."""
    if workload.kind == "decode":
        return ["eager", "compile"] if workload.cache == "static" and device.type == "cuda" else ["eager"]
    if device.type == "cpu" and (quick or workload.model != "gpt"):
        return ["eager"]
    return ["eager", "compile"]


# -------------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(call: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


def _time(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``call`` over ``repeats`` runs (after one warm-up run)."""
    call()
    return statistics.median(_seconds(call, device) for _ in range(repeats))


def _time_decode(generate: Callable[[int], object], new_tokens: int, device: torch.device, repeats: int) -> float:
    """Seconds of ``new_tokens`` decoding steps: the median over ``repeats`` interleaved pairs of
    generate(new_tokens + 1) - generate(1), so the prefill (and its noise) cancels pair by pair. ValueError when
    the steps do not stand out of the timing noise (a shape too small to time)."""
    generate(new_tokens + 1)
    generate(1)
    def pair() -> float:
        return _seconds(lambda: generate(new_tokens + 1), device) - _seconds(lambda: generate(1), device)

    seconds = statistics.median(pair() for _ in range(max(repeats, 3)))
    if seconds <= 0:
        raise ValueError(f"{new_tokens} decoding steps did not stand out of the timing noise")
    return seconds


@functools.lru_cache(maxsize=None)
def _num_params(model: str, shape: Shape) -> int:
    """Parameters of the workload's model (built on the meta device: no memory, no initialisation) by nanoGPT's
    ``get_num_params`` convention: all but the input embeddings (token and position), the LM head counted once
    whether or not it is tied to the token embedding."""
    meta = torch.device("meta")
    with meta:
        module = _gpt(shape, "reference", meta) if model == "gpt" else _llama(shape, "eager", meta)
    head = module.lm_head.weight
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)} - {id(head)}
    return sum(p.numel() for p in module.parameters() if id(p) not in embeddings)


def _flops_per_token(workload: Workload) -> float:
    """nanoGPT's estimate: 6N + 12 L width T per trained token, a third of it per forward token (T = the context a
    token attends over; N = :func:`_num_params`, the model's own count: the attention, MLP (Llama's SwiGLU) with
    grouped K/V projections as built, the norms and the LM head; not the input embeddings)."""
    s = workload.shape
    context = s.length + s.new_tokens // 2 if workload.kind == "decode" else s.length
    train = 6 * _num_params(workload.model, s) + 12 * s.layers * s.width * context
    return train if workload.kind == "train" else train / 3


def mfu(workload: Workload, tokens_per_s: float, peak: dict) -> float:
    """Model FLOPs utilisation: :func:`_flops_per_token` x ``tokens_per_s`` over the peak FLOP/s of the dtype a GPU
    runs the workloads in (bf16; ``peak["flops"]`` is per dtype, ``DeviceInfo.peak``)."""
    dtype = str(_dtype(torch.device("cuda"))).removeprefix("torch.")
    return round(_flops_per_token(workload) * tokens_per_s / peak["flops"][dtype], 4)


def _counted_bytes(call: Callable[[], object]) -> int:
    from benchmarks.counting import counting

    with counting() as counts:
        call()
    return counts.bytes


def _decode_step_bytes(generate: Callable[[int], object]) -> int:
    """Bytes one decoding step reads and writes: generate(2) - generate(1), the same prefill cancelling (generate(2)
    alone is the prompt's prefill plus a step)."""
    return _counted_bytes(lambda: generate(2)) - _counted_bytes(lambda: generate(1))


def measure(workload: Workload, provider: str, mode: str, device: DeviceInfo, repeats: int) -> dict:
    """One record: ms per step, tokens/s, MFU and peak bytes (GPU) or counted bytes (CPU)."""
    dev = device.torch_device
    record = {"workload": workload.name, "kind": workload.kind, "model": workload.model, "provider": provider,
              "mode": mode, "device": device.name, "shape": vars(workload.shape).copy(), "status": "ok",
              "timing": "CUDA-synchronised wall time, median" if dev.type == "cuda" else
              "CPU wall time, median; Triton providers run in Triton's interpreter: not a GPU figure",
              "tokens_per_s": None, "ms_per_step": None, "peak_bytes": None, "mfu": None, "counted_bytes": None}
    try:
        step, tokens = build(workload, provider, mode, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        if workload.kind == "decode":
            n = workload.shape.new_tokens
            seconds = _time_decode(step, n, dev, repeats)
            per_step = seconds / n
        else:
            per_step = _time(step, dev, repeats)
            seconds = per_step
        record.update(ms_per_step=float(f"{per_step * 1e3:.4g}"), tokens_per_s=float(f"{tokens / seconds:.4g}"))
        if dev.type == "cuda":
            record["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
            if device.peak:
                record["mfu"] = mfu(workload, tokens / seconds, device.peak)
        else:
            record["counted_bytes"] = _decode_step_bytes(step) if workload.kind == "decode" else _counted_bytes(step)
    except Exception as error:  # a provider that cannot run a workload is recorded, not fatal
        record.update(status="error", reason=f"{type(error).__name__}: {error}"[:300])
        traceback.print_exc(limit=2, file=sys.stderr)
    return record


# -------------------------------------------------------------------------------------------------- report


CONVENTIONS = {
    "workload": "name of the workload; kind: train (forward, backward, AdamW step), prefill (forward over left-padded "
                "prompts) or decode (greedy generate() with a dynamic or static cache); model: gpt (the reference "
                "GPT) or llama (a Hugging Face Llama built from a config); shape: layers, heads, kv_heads, width, "
                "batch, length (decode: the prompt), vocab, new_tokens (decode: the steps timed).",
    "provider": "ours: triton (the GPT's triton backend) or triton (patch) (a transformer.patch()ed model); torch's: "
                "torch sdpa, torch reference (the GPT's backends), hf sdpa, hf eager, hf flash_attention_2 "
                "(transformers' attention); mode: eager or compile (torch.compile).",
    "status": "ok, error (reason: the exception), unavailable (reason: a missing dependency) or skipped (--budget "
              "spent).",
    "timing": "how ms_per_step was taken: GPU CUDA-synchronised wall time; CPU wall time, the Triton providers in "
              "Triton's interpreter (not a GPU figure). Medians over the repeats after a warm-up run.",
    "ms_per_step": "one step: train and prefill a call; decode one token per sequence, (generate(N + 1) - "
                   "generate(1)) / N, so the prefill cancels. tokens_per_s: the tokens a step processes (train: "
                   "batch x length; prefill: the unpadded tokens; decode: batch per step) / its time.",
    "peak_bytes": "GPU only: torch.cuda.max_memory_allocated over the warm-up and timed runs, above what was "
                  "allocated once the model was built (None on CPU).",
    "mfu": "GPU only, when the device's peak is known: model FLOPs (nanoGPT's 6N + 12 L H Q T per trained token, a "
           "third of it per forward token) x tokens/s over the peak bf16 FLOPs.",
    "counted_bytes": "CPU only: bytes read and written by every aten op and interpreted Triton load/store "
                     "(benchmarks/counting.py) in one step: train and prefill one call; decode one decoding step, "
                     "counted generate(2) - generate(1) so the prompt's prefill cancels.",
}
"""What ``model.json``'s record fields mean (the suite's ``records.CONVENTIONS`` describe its other records)."""


def format_table(recs: List[dict]) -> str:
    lines = [f"{'workload':34} {'provider':22} {'mode':8} {'ms/step':>10} {'tokens/s':>11} {'vs best torch':>13}"]
    best_torch: Dict[str, float] = {}
    for r in recs:
        if r["status"] == "ok" and "triton" not in r["provider"]:
            best_torch[r["workload"]] = max(best_torch.get(r["workload"], 0.0), r["tokens_per_s"])
    for r in recs:
        if r["status"] != "ok":
            lines.append(f"{r['workload']:34} {r['provider']:22} {r['mode']:8} {r['status']}: {r.get('reason', '')}")
            continue
        ratio = r["tokens_per_s"] / best_torch[r["workload"]] if best_torch.get(r["workload"]) else float("nan")
        # Two significant digits below 0.1: an interpreted kernel is often ~0.001x, which ".2f" showed as 0.00x.
        ratio_text = f"{ratio:.2g}" if ratio < 0.1 else f"{ratio:.2f}"
        interpreted = "interpreter" in r["timing"] and "triton" in r["provider"]
        lines.append(f"{r['workload']:34} {r['provider']:22} {r['mode']:8} {r['ms_per_step']:10.2f} "
                     f"{r['tokens_per_s']:11.1f} {ratio_text:>12}x" + "  (interpreted: not GPU speed)" * interpreted)
    return "\n".join(lines)


def plot(recs: List[dict], device: DeviceInfo, out: str) -> List[str]:
    """One bar chart of tokens/s per workload (provider x mode); none without matplotlib."""
    if not plots.have_pyplot():
        return []
    plt = plots.plt
    written = []
    for name in dict.fromkeys(r["workload"] for r in recs):
        ok = [r for r in recs if r["workload"] == name and r["status"] == "ok"]
        if not ok:
            continue
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(ok) + 1.6))
        labels = [f"{r['provider']} ({r['mode']})" for r in ok]
        colors = ["tab:orange" if "triton" in r["provider"] else "tab:blue" for r in ok]
        ax.barh(range(len(ok)), [r["tokens_per_s"] for r in ok], color=colors)
        ax.set_yticks(range(len(ok)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s" + (" (CPU; Triton interpreted: not a GPU figure)" if device.kind == "cpu" else ""))
        ax.set_title(f"{name} on {device.name}")
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        written += plots.save(fig, os.path.join(out, f"model_{slug}.png"), dpi=100)
    plots.drop_stale(out, "model_*.png", written)
    return written


def selected(kind: str, quick: bool, only: Optional[List[str]]) -> List[Workload]:
    """The workloads whose name contains one of the words of ``only`` (all of them without ``only``)."""
    return [w for w in workloads(kind, quick) if not only or any(word in w.name for word in only)]


def missing_dependency(workload: Workload) -> Optional[str]:
    """Why ``workload`` cannot run in this process (the Llama workloads need transformers), or None."""
    if workload.model != "llama":
        return None
    try:
        import transformers  # noqa: F401  (an optional dependency: the "hf" extra)
    except ImportError as error:
        return f"transformers is not installed ({error})"
    return None


def _not_run(workload: Workload, provider: str, mode: str, device: DeviceInfo, status: str, reason: str) -> dict:
    """The record of a point that was not measured, and why."""
    return {"workload": workload.name, "kind": workload.kind, "provider": provider, "mode": mode,
            "device": device.name, "status": status, "reason": reason, "tokens_per_s": None, "ms_per_step": None,
            "peak_bytes": None}


def points(device: DeviceInfo, quick: bool, repeats: int, only: Optional[List[str]] = None,
           deadline: Optional[float] = None) -> Iterator[dict]:
    """Every (workload, provider, mode) record as it is measured; past ``deadline`` (time.monotonic) the rest are
    'skipped', and the Llama ones are 'unavailable' without transformers."""
    for workload in selected(device.kind, quick, only):
        providers = GPT_PROVIDERS if workload.model == "gpt" else hf_providers()
        missing = missing_dependency(workload)
        for provider in providers:
            for mode in modes(workload, device.torch_device, quick):
                if missing is not None:
                    yield _not_run(workload, provider, mode, device, "unavailable", missing)
                elif deadline is not None and time.monotonic() > deadline:
                    yield _not_run(workload, provider, mode, device, "skipped", "time budget spent")
                else:
                    record = measure(workload, provider, mode, device, repeats)
                    print(f"  {workload.name} / {provider} / {mode}: {record['status']} "
                          f"{record['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
                    yield record


def run(device: DeviceInfo, quick: bool, repeats: int, only: Optional[List[str]] = None,
        deadline: Optional[float] = None) -> List[dict]:
    """:func:`points` as a list."""
    return list(points(device, quick, repeats, only, deadline))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=records.out_dir, default="results",
                        help="folder for model.json/.csv and the PNGs")
    parser.add_argument("--quick", action="store_true", help="fewer workloads and repeats (about two minutes on CPU)")
    parser.add_argument("--only", nargs="+", help="only workloads whose name contains one of these words")
    parser.add_argument("--repeats", type=at_least(1), default=None,
                        help="timed runs per point (default 5 GPU, 2 CPU, 1 CPU with --quick)")
    parser.add_argument("--budget", type=at_least(0.0, float), default=None,
                        help="seconds; later points are recorded skipped")
    parser.add_argument("--threads", type=at_least(1), default=1,
                        help="CPU only: torch threads (default 1, as the suite: on a shared machine a step waiting "
                             "for a busy second thread can take 100x longer)")
    args = parser.parse_args(argv)
    device = detect()
    if not selected(device.kind, args.quick, args.only):
        parser.error(f"no workload's name contains any of --only {' '.join(args.only)}; the workloads: "
                     + ", ".join(w.name for w in workloads(device.kind, args.quick)))
    print(f"device: {device.name}  (timing: {'GPU wall time' if device.kind == 'cuda' else 'CPU, Triton interpreted'})",
          flush=True)
    repeats = args.repeats or (5 if device.kind == "cuda" else (1 if args.quick else 2))
    deadline = None if args.budget is None else time.monotonic() + args.budget
    with cpu_threads(device, args.threads):
        recs = run(device, args.quick, repeats, args.only, deadline)
    records.report(args.out, "model", device, {**vars(args), "command": "model", "repeats": repeats}, recs,
                   format_table(recs), plot, conventions=CONVENTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
