"""``python -m benchmarks`` (the suite): every op, its providers, forward and forward+backward, a few sizes.

On CPU the sizes are small because the Triton providers run interpreted (seconds per call); on a GPU they are the
usual benchmark sizes.
"""
from typing import Dict, List

from benchmarks.providers import MODES, OPS, Case

# (attention lengths, softmax/norm row lengths), per device kind and --quick
LENGTHS = {
    ("cpu", True): ([64, 128], [256, 512]),
    ("cpu", False): ([128, 256, 512], [256, 512, 1024, 2048]),
    ("cuda", True): ([1024, 2048], [1024, 4096]),
    ("cuda", False): ([1024, 2048, 4096, 8192], [1024, 2048, 4096, 8192]),
}
ROWS = {"cpu": 256, "cuda": 4096}


def cases(kind: str, quick: bool, max_len: int, dims: dict, ops=OPS) -> Dict[str, List[Case]]:
    """op -> cases. ``dims``: batch, heads, head_dim, dtype (attention uses all, the others only dtype)."""
    attention_lengths, row_lengths = LENGTHS[(kind, quick)]
    groups = {}
    for op in ops:
        lengths = attention_lengths if op == "attention" else row_lengths
        groups[op] = [Case(op, mode, n, rows=ROWS[kind], causal=True, **dims)
                      for mode in MODES for n in lengths if n <= max_len]
    return groups
