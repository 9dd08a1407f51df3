"""``python -m benchmarks scaling``: how causal attention's cost grows with context length.

Lengths double from 128 to --max-len (default: 1024 on CPU, where the kernels are interpreted; 16k on a GPU, where
the quadratic baseline runs out of memory first, which is recorded and does not stop the run); fixed
batch x heads x head_dim; forward and forward+backward; every attention provider. Among them the fused kernel with
a sliding window and with a document mask (``benchmarks/providers.py``): their counted FLOPs and bytes grow as
N * window (fitted slope -> 1 once N >> window; causal's is 2; a fit from N < 2 windows says so) and tend to
1 / documents of causal's (``vs_causal`` in the records) once a document spans many query tiles: a document
shorter than one tile costs a whole tile, so at small N the counts stay flat.
"""
from typing import Dict, List

from benchmarks.providers import MODES, Case

DEFAULT_MAX_LEN = {("cpu", False): 1024, ("cpu", True): 256, ("cuda", False): 16384, ("cuda", True): 2048}


def lengths(max_len: int, start: int = 128) -> List[int]:
    out = []
    n = start
    while n <= max_len:
        out.append(n)
        n *= 2
    return out


def cases(max_len: int, dims: dict) -> Dict[str, List[Case]]:
    return {"attention": [Case("attention", mode, n, causal=True, **dims) for mode in MODES for n in lengths(max_len)]}
