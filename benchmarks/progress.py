"""A progress bar on stderr where tqdm is installed (the "bench" extra), and none where it is not: a bare GPU
machine with only torch and triton still runs every command."""
import contextlib
import sys


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (a context manager) counting to ``total``; ``nullcontext()`` (``None`` in the ``with``) when
    disabled or tqdm is not installed."""
    if not enabled:
        return contextlib.nullcontext()
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
