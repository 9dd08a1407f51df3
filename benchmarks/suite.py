"""``python -m benchmarks`` (the suite): every op, its providers, forward and forward+backward, a few sizes.

On CPU the sizes are small because the Triton providers run interpreted (seconds per call); on a GPU they are the
usual benchmark sizes.
"""
import argparse
from typing import Callable, Dict, List

from benchmarks.providers import MODES, OPS, Case

HIDDEN_SIZES = [768, 1024, 2048, 4096, 5120, 8192]
"""Real models' hidden sizes (GPT-2 small/medium, Llama 1B-70B): the softmax/norm rows a model runs."""
WIDE_ROWS = [16384, 65536]
"""Rows wider than a one-block kernel holds (vocabulary-sized softmax): the two-pass paths."""
# (attention lengths, softmax/norm row lengths), per device kind and --quick
LENGTHS = {
    ("cpu", True): ([64, 128], [256, 1024]),
    ("cpu", False): ([64, 128, 256], [256, *HIDDEN_SIZES, *WIDE_ROWS]),
    ("cuda", True): ([1024, 2048], [1024, 4096]),
    ("cuda", False): ([1024, 2048, 4096, 8192], [*HIDDEN_SIZES, *WIDE_ROWS]),
}
# Interpreted softmax/norm kernels cost a few ms per program (one per row): few rows on CPU.
ROWS = {("cpu", True): 32, ("cpu", False): 64, ("cuda", True): 4096, ("cuda", False): 16384}
"""A GPU's 16k rows: a training batch of tokens (8 x 2048), enough rows per program that the norms' per-program
weight reads and fp32 dweight/dbias partials stay a few percent of the traffic."""
DIMS = {"cpu": {"batch": 1, "heads": 2, "head_dim": 64, "dtype": "float16"},
        "cuda": {"batch": 4, "heads": 16, "head_dim": 64, "dtype": "float16"}}
"""Default attention sizes and dtype per device kind (the command-line options override them). float16 on CPU too,
so the counted bytes of the Triton kernels use the tiles a GPU runs for float16 (fp32 tiles are far smaller)."""


def cases(kind: str, quick: bool, max_len: int, dims: dict, ops=OPS) -> Dict[str, List[Case]]:
    """op -> cases. ``dims``: batch, heads, head_dim, dtype (attention uses all, the others only dtype)."""
    attention_lengths, row_lengths = LENGTHS[(kind, quick)]
    groups = {}
    for op in ops:
        lengths = attention_lengths if op == "attention" else row_lengths
        groups[op] = [Case(op, mode, n, rows=ROWS[(kind, quick)], causal=True, **dims)
                      for mode in MODES for n in lengths if n <= max_len]
    return groups


def at_least(minimum: float, kind: type = int) -> Callable[[str], object]:
    """An argparse type: '64' -> 64 (``kind`` int) or '0.5' -> 0.5 (float), at least ``minimum``; anything else is
    an argparse error (not a silent default: a size option whose default is chosen by a falsy value)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:  # NaN too
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {minimum}, "
                                             f"got {text!r}")
        return value

    return parse
