"""``python -m benchmarks hf-masks``: the bytes a Hugging Face model moves for its attention masks, with
transformers' own masks (``attn_implementation="sdpa"``) and with ``transformer.hf``'s mask function.

A tiny Llama (random weights, nothing downloaded) runs one forward over a left-padded batch at two or more
sequence lengths S, twice per path, everything counted by ``benchmarks.counting`` (every aten op's inputs and
outputs; the interpreted Triton kernel's loads and stores):

1. the whole forward;
2. again, counting separately the model's mask construction (``create_causal_mask``, once per forward: it calls
   transformers' ``sdpa_mask`` or ``transformer.hf.kernel_mask``) with the largest tensor it allocates, and each
   layer's attention-interface call (transformers' SDPA function or ``hf_attention``), with the bytes of the mask
   handed to it.

"Outside attention" is the forward minus its attention calls: the same embeddings, projections, rotary, MLP and
norms on both paths, plus the mask construction. Their difference per layer is what transformers' mask costs
beyond ours. Both paths are counted the same way; only ``use_kernel_attention`` is applied (``transformer.patch``
would also swap the norms for Triton kernels, whose bytes would mix into the difference). The fitted growth
exponents (bytes ~ S^p) show which mask grows quadratically. CPU SDPA is one opaque aten op: its reads of the mask
count (as its input), its internal traffic does not; the attention calls are excluded from "outside" anyway.

Writes ``hf_masks.json`` and ``hf_masks.csv`` under ``--out``.
"""
import argparse
import contextlib
import sys
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import records
from benchmarks.suite import at_least
from benchmarks.analysis import loglog_slope
from benchmarks.counting import counting, touched_bytes
from benchmarks.device import detect

SEQ_LENS = {"cpu": [64, 256], "cuda": [1024, 4096]}
BATCH = 2
PATHS = ("sdpa", "kernel")  # transformers' own masks and SDPA; transformer.hf's mask function and kernel
CONVENTIONS = {
    "path": "sdpa (transformers' own masks and SDPA attention) or kernel (transformer.hf's mask function and "
            "kernel, through use_kernel_attention); attn_implementation: the model config's; seq_len, batch, "
            "layers: the left-padded (batch, seq_len) input and the tiny Llama's decoder layers.",
    "forward": "counts of one whole forward (bytes_read, bytes_written, bytes, flops, ...): bytes read and written "
               "by every aten op and interpreted Triton load/store (benchmarks/counting.py); nothing is timed. "
               "attention_bytes: those of its attention-interface calls; outside_attention_bytes: forward.bytes "
               "minus attention_bytes.",
    "mask_build": "the model's create_causal_mask call, once per forward: its counts, and the largest tensor it "
                  "allocates (largest_tensor_bytes, largest_tensor_shape).",
    "mask_handed_per_layer": "per attention call, what it was given as its mask: type (Tensor, KernelMask or "
                             "NoneType), shape and bytes (a KernelMask: its (batch, keys) padding).",
    "fits": "per path, slopes: p of bytes ~ seq_len^p (log-log least squares) of mask_build_bytes, "
            "largest_mask_tensor_bytes and outside_attention_bytes. config.differences: per seq_len, sdpa minus "
            "kernel outside-attention bytes per layer and mask-construction bytes per forward.",
}
"""What ``hf_masks.json``'s fields mean."""


def tiny_llama(layers: int = 2, max_len: int = 4096):
    """A random-weight Llama small enough for the interpreter (hidden 64, 4 heads, 2 kv heads, head dim 16)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                                      bos_token_id=0, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


class _Largest(TorchDispatchMode):
    """The largest tensor any aten op returns (touched bytes, shape)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and touched_bytes(t) > self.bytes:
                self.bytes, self.shape = touched_bytes(t), list(t.shape)
        return out


def _handed_mask(mask) -> dict:
    """What an attention call was given as its mask: a tensor, a KernelMask (its (B, Nk) padding) or None."""
    tensor = getattr(mask, "key_padding", mask)
    if not isinstance(tensor, torch.Tensor):
        return {"type": type(mask).__name__, "shape": None, "bytes": 0}
    return {"type": type(mask).__name__, "shape": list(tensor.shape), "bytes": touched_bytes(tensor)}


@contextlib.contextmanager
def _instrumented(model, phase: dict):
    """Count the model's mask construction and each attention call separately into ``phase``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    impl = model.config._attn_implementation
    attention, create_mask = ALL_ATTENTION_FUNCTIONS[impl], modeling_llama.create_causal_mask

    def counted_mask(*args, **kwargs):
        with counting() as counts, _Largest() as largest:
            mask = create_mask(*args, **kwargs)
        phase["mask_build"] = {**counts.as_record(), "largest_tensor_bytes": largest.bytes,
                               "largest_tensor_shape": largest.shape}
        return mask

    def counted_attention(module, query, key, value, attention_mask, *args, **kwargs):
        with counting() as counts:
            out = attention(module, query, key, value, attention_mask, *args, **kwargs)
        phase["attention_calls"].append({**counts.as_record(), "mask": _handed_mask(attention_mask)})
        return out

    ALL_ATTENTION_FUNCTIONS[impl] = counted_attention  # this instance's local mapping, restored below
    modeling_llama.create_causal_mask = counted_mask
    try:
        yield
    finally:
        modeling_llama.create_causal_mask = create_mask
        del ALL_ATTENTION_FUNCTIONS[impl]


def measure(path: str, seq_len: int, device: torch.device, layers: int = 2) -> dict:
    """One record: the counts of a forward of the tiny Llama over a left-padded (BATCH, seq_len) batch."""
    from transformer.hf import use_kernel_attention

    model = tiny_llama(layers, max(4096, seq_len)).to(device)
    if path == "kernel":
        use_kernel_attention(model)
    ids = torch.randint(1, 64, (BATCH, seq_len), device=device)
    mask = torch.ones(BATCH, seq_len, dtype=torch.long, device=device)
    mask[0, :seq_len // 4] = 0  # row 0 left-padded by a quarter
    phase = {"attention_calls": []}
    with torch.no_grad():
        with counting() as forward:
            model(ids, attention_mask=mask)
        with _instrumented(model, phase):
            model(ids, attention_mask=mask)
    attention_bytes = sum(call["bytes"] for call in phase["attention_calls"])
    return {"path": path, "attn_implementation": model.config._attn_implementation, "seq_len": seq_len,
            "batch": BATCH, "layers": layers, "forward": forward.as_record(), "attention_bytes": attention_bytes,
            "outside_attention_bytes": forward.bytes - attention_bytes, "mask_build": phase["mask_build"],
            "mask_handed_per_layer": [call["mask"] for call in phase["attention_calls"]]}


def differences(recs: List[dict]) -> List[dict]:
    """Per sequence length: (transformers' outside-attention bytes - ours) per layer."""
    out = []
    for seq_len in dict.fromkeys(r["seq_len"] for r in recs):
        by_path = {r["path"]: r for r in recs if r["seq_len"] == seq_len}
        sdpa, kernel = by_path["sdpa"], by_path["kernel"]
        out.append({"seq_len": seq_len, "outside_attention_bytes_per_layer_sdpa_minus_kernel":
                    (sdpa["outside_attention_bytes"] - kernel["outside_attention_bytes"]) / sdpa["layers"],
                    "mask_build_bytes_sdpa_minus_kernel": sdpa["mask_build"]["bytes"] - kernel["mask_build"]["bytes"]})
    return out


def fits(recs: List[dict]) -> List[dict]:
    """Growth exponent p (bytes ~ S^p) per path of the mask construction, of the largest mask tensor and of the
    bytes outside attention."""
    metrics = {"mask_build_bytes": lambda r: r["mask_build"]["bytes"],
               "largest_mask_tensor_bytes": lambda r: r["mask_build"]["largest_tensor_bytes"],
               "outside_attention_bytes": lambda r: r["outside_attention_bytes"]}
    out = []
    for path in PATHS:
        rows = [r for r in recs if r["path"] == path]
        out.append({"path": path, "slopes": {name: loglog_slope([r["seq_len"] for r in rows], [m(r) for r in rows])
                                             for name, m in metrics.items()}})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks hf-masks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=records.out_dir, default="results",
                        help="folder for hf_masks.json and hf_masks.csv")
    parser.add_argument("--seq-lens", type=at_least(1), nargs="+",
                        help="sequence lengths (default 64 256 on CPU; a repeated one is measured once)")
    parser.add_argument("--layers", type=at_least(1), default=2, help="decoder layers of the tiny Llama")
    args = parser.parse_args(argv)
    device = detect()
    print(f"device: {device.name}  (counted bytes only: nothing here is timed)", flush=True)
    seq_lens = sorted(set(args.seq_lens)) if args.seq_lens else SEQ_LENS[device.kind]
    recs = [measure(path, n, device.torch_device, args.layers) for n in seq_lens for path in PATHS]
    layers = f"{args.layers} layer{'' if args.layers == 1 else 's'}"
    print(f"tiny Llama, {layers}, batch {BATCH} left-padded (row 0 by S/4), float32; bytes counted")
    print(f"{'S':>6}  {'path':7}{'forward MB':>11}{'outside attn MB':>16}{'mask build MB':>14}"
          f"  {'largest mask tensor':28}{'mask handed per layer':>24}")
    for r in recs:
        build, handed = r["mask_build"], r["mask_handed_per_layer"][0]
        largest = f"{build['largest_tensor_shape']} {build['largest_tensor_bytes']} B"
        print(f"{r['seq_len']:>6}  {r['path']:7}{r['forward']['bytes'] / 1e6:>11.3f}"
              f"{r['outside_attention_bytes'] / 1e6:>16.3f}{build['bytes'] / 1e6:>14.4f}  {largest:28}"
              f"{handed['type']} {handed['shape']} {handed['bytes']} B".rjust(24))
    diffs = differences(recs)
    for d in diffs:
        print(f"S={d['seq_len']}: outside-attention bytes per layer, transformers' masks minus ours: "
              f"{d['outside_attention_bytes_per_layer_sdpa_minus_kernel']:.0f} B "
              f"(mask construction: {d['mask_build_bytes_sdpa_minus_kernel']} B per forward)")
    growth = fits(recs)
    for fit in growth:
        print(f"growth over S (bytes ~ S^p), {fit['path']}: " + ", ".join(
            f"{name} p={'-' if p is None else f'{p:.2f}'}" for name, p in fit["slopes"].items()))
    config = {**vars(args), "seq_lens": seq_lens, "batch": BATCH, "command": "hf-masks", "differences": diffs}
    doc = records.document("hf-masks", device, config, recs, growth)
    doc["conventions"] = CONVENTIONS
    written = records.write(args.out, "hf_masks", doc)
    print("wrote: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
