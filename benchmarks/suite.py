"""``python -m benchmarks`` (the suite): every op, its providers, forward and forward+backward, a few sizes.

On CPU the sizes are small because the Triton providers run interpreted (seconds per call); on a GPU they are the
usual benchmark sizes.
"""
from typing import Dict, List

from benchmarks.providers import MODES, OPS, Case

# (attention lengths, softmax/norm row lengths), per device kind and --quick
LENGTHS = {
    ("cpu", True): ([64, 128], [256, 1024]),
    ("cpu", False): ([64, 128, 256], [256, 1024, 4096]),
    ("cuda", True): ([1024, 2048], [1024, 4096]),
    ("cuda", False): ([1024, 2048, 4096, 8192], [1024, 2048, 4096, 8192]),
}
# Interpreted softmax/norm kernels cost a few ms per program (one per row): few rows on CPU.
ROWS = {("cpu", True): 32, ("cpu", False): 64, ("cuda", True): 4096, ("cuda", False): 4096}
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
