"""Train a character-level GPT on the text shipped with the package: ``python -m transformer.train --backend triton``.

Every character of the text is a token; the model learns to predict the next character. The same seed gives the
same initial weights and the same batches whatever the backend, so backends can be compared step by step.
"""
import argparse
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from kernels.distributed import LAYOUTS, shard
from transformer.model import BACKENDS, GPT, GPTConfig

TEXT_PATH = Path(__file__).parent / "data" / "tiny_tales.txt"


class CharTokenizer:
    """Maps each distinct character of a text to an id (sorted, so the mapping depends only on the text)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"text: characters {unknown} are not in the training text's vocabulary")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def load_text(path: Optional[str] = None) -> str:
    return Path(path or TEXT_PATH).read_text(encoding="utf-8")


def get_batch(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator):
    """Random windows of the 1-D token tensor ``data``: x (B, T) and the next-token targets y (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts])
    return x, y


def train(backend: str = "reference", steps: int = 200, batch_size: int = 8, seed: int = 0, device: str = "cpu",
          block_size: int = 64, n_layer: int = 2, n_head: int = 4, n_kv_head: Optional[int] = None,
          n_embd: int = 64, lr: float = 3e-3, text_path: Optional[str] = None,
          progress: bool = True, context_parallel: Optional[str] = None,
          dtype: Optional[torch.dtype] = None) -> Tuple[GPT, CharTokenizer, List[float]]:
    """Train with AdamW for ``steps`` steps; returns the model, the tokenizer and the loss of every step.

    ``dtype``: the parameters' dtype after the (float32) initialisation, e.g. float64 for an exact reference run.

    ``context_parallel`` (a layout of ``kernels.distributed``, triton backend): this process is one of the P ranks
    of the initialised default process group. Every rank draws the same batches and runs the model on its shard
    of each sequence (ring attention, the shard's positions); the loss is the mean over all P shards and the
    gradients are summed over the ranks, so every rank takes the single-process step.
    """
    text = load_text(text_path)
    tokenizer = CharTokenizer(text)
    data = tokenizer.encode(text)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, backend=backend)
    model = GPT(config).to(device=device, dtype=dtype)
    world, positions = 1, None
    if context_parallel is not None:
        model.set_context_parallel(context_parallel)
        world = dist.get_world_size()
        chunks = world * (2 if context_parallel == "zigzag" else 1)
        if block_size % chunks:
            raise ValueError(f"block_size ({block_size}) must split into {chunks} equal chunks for {context_parallel} "
                             f"context parallelism over {world} ranks")
        positions = shard(torch.arange(block_size), 0, context_parallel).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=f"train ({backend})", disable=not progress)
    for _ in bar:
        x, y = get_batch(data, block_size, batch_size, generator)
        if context_parallel is not None:
            x, y = shard(x, 1, context_parallel), shard(y, 1, context_parallel)
        _, loss = model(x.to(device), y.to(device), positions=positions)
        optimizer.zero_grad(set_to_none=True)
        (loss / world).backward()  # every shard holds B * T / P tokens: the global mean is the mean of the P means
        if context_parallel is not None:
            loss = _sum_over_ranks(model, loss.detach()) / world
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return model, tokenizer, losses


def _sum_over_ranks(model: GPT, loss: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) every gradient of ``model`` and ``loss`` over the default process group, in place."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
    dist.all_reduce(loss)
    return loss


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """A usage error for a --device torch cannot parse, one that holds no data (meta), or a CUDA one on a machine
    without CUDA."""
    try:
        device_type = torch.device(device).type
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device_type == "meta":  # (training read the loss of a tensor without data after building the model)
        parser.error("--device meta: tensors there hold no data to train on")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device (torch.cuda.is_available() is False)")


def _join_ranks(device: str) -> int:
    """Join torchrun's process group (NCCL on a CUDA device, one GPU per rank; gloo otherwise); returns the rank."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=10))
    return dist.get_rank()


def int_at_least(low: int):
    """An argparse ``type``: an int >= ``low``; anything else is argparse's usage error (exit status 2)."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError: argparse's "invalid int value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def seed_value(text: str) -> int:
    """An argparse ``type``: an int in torch.manual_seed's range [-2**63, 2**64 - 1]; else argparse's usage error
    (a larger one was torch's overflow traceback after the model was built)."""
    value = int(text)  # a ValueError: argparse's "invalid int value"
    if not -2 ** 63 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64 - 1] (torch.manual_seed's range), got {value}")
    return value


def sample_prompt(tokenizer: CharTokenizer) -> str:
    """Where the samples start: "The " when the training text has those characters (the shipped text does), else
    its first character in sorted order that is not whitespace (a --text without them crashed after training)."""
    if all(c in tokenizer.index for c in "The "):
        return "The "
    return next((c for c in tokenizer.chars if not c.isspace()), tokenizer.chars[0])


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    value = float(text)
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {value}")
    return value


def tokenizer_for_flags(parser: argparse.ArgumentParser, text_path: Optional[str], **sizes) -> CharTokenizer:
    """The tokenizer of the training text; a usage error (``parser.error``) for a text that cannot be read or is
    no longer than ``sizes["block_size"]``, and for model sizes (GPTConfig's fields) that GPTConfig rejects."""
    try:
        text = load_text(text_path)
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        parser.error(f"--text: {error}")
    if len(text) <= sizes["block_size"]:
        parser.error(f"--text: {len(text)} characters, but a training window takes block_size + 1 = "
                     f"{sizes['block_size'] + 1}")
    tokenizer = CharTokenizer(text)
    try:
        GPTConfig(vocab_size=tokenizer.vocab_size, **sizes)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="reference")
    parser.add_argument("--steps", type=int_at_least(0), default=200)
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="on a CPU the triton backend runs in Triton's interpreter: exact but slow, about 12 s "
                             "of CPU time a step at the default size (the reference backend: milliseconds)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-kv-head", type=int, default=None)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--text", default=None, help="a UTF-8 text file to train on (default: the shipped text)")
    parser.add_argument("--sample", type=int_at_least(0), default=200, help="characters to generate after training")
    parser.add_argument("--context-parallel", nargs="?", const="zigzag", choices=LAYOUTS, default=None,
                        help="run as one of torchrun's ranks, each holding a shard (zigzag by default) of every "
                             "sequence: torchrun --nproc-per-node P -m transformer.train --context-parallel "
                             "(implies --backend triton; NCCL on GPUs, one per rank, gloo on CPU)")
    args = parser.parse_args(argv)
    tokenizer_for_flags(parser, args.text, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_kv_head=args.n_kv_head, n_embd=args.n_embd)
    _check_device(parser, args.device)
    rank, device, backend = 0, args.device, args.backend
    if args.context_parallel is not None:
        if "WORLD_SIZE" not in os.environ:
            parser.error("--context-parallel: run under torchrun (torchrun --nproc-per-node P -m transformer.train "
                         "--context-parallel), which sets each rank's RANK and WORLD_SIZE")
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        rank, backend = _join_ranks(device), "triton"
    try:
        model, tokenizer, losses = train(backend, args.steps, args.batch_size, args.seed, device, args.block_size,
                                         args.n_layer, args.n_head, args.n_kv_head, args.n_embd, args.lr, args.text,
                                         progress=rank == 0, context_parallel=args.context_parallel)
    finally:
        if args.context_parallel is not None:
            dist.destroy_process_group()
    if rank != 0:
        return
    if losses:
        print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
    if args.sample:
        model.set_context_parallel(None).eval()
        start = tokenizer.encode(sample_prompt(tokenizer)).view(1, -1).to(device)
        out = model.generate(start, args.sample, temperature=0.8, top_k=10)
        print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
