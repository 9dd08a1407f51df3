"""What is measured: benchmark cases (op, mode, sizes) and the provider table (who computes each op).

A provider is looked up lazily: one whose function is not importable (a kernel the package does not export,
flash-attn not installed, no GPU) is reported as unavailable with the reason, never replaced by a stand-in.

Two attention providers compute a sparser mask on the same causal case, to show how its cost scales: the fused
kernel with a sliding window of :data:`WINDOW` keys (cost ~ N * WINDOW), and with the N tokens split into
:data:`DOCUMENTS` equal documents attending causally within themselves (``attention_varlen``: ~1 / DOCUMENTS of
causal). Their names say so.
"""
import importlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from kernels import reference

OPS = ("attention", "softmax", "layer_norm", "rms_norm")
MODES = ("fwd", "fwd+bwd")
WINDOW = 256  # keys a query sees in the sliding-window provider: itself and the WINDOW - 1 before it
DOCUMENTS = 8  # equal documents the document-mask provider splits each sequence into


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``length`` is the size that varies: the sequence length N for attention (inputs
    (batch, heads, N, head_dim)), the row length for softmax and the hidden size for the norms (inputs (rows, N)).
    """

    op: str
    mode: str
    length: int
    dtype: str = "float32"
    causal: bool = True
    batch: int = 1
    heads: int = 2
    head_dim: int = 64
    rows: int = 256

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def shape(self) -> Tuple[int, ...]:
        if self.op == "attention":
            return (self.batch, self.heads, self.length, self.head_dim)
        return (self.rows, self.length)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def conventional_flops(self) -> Optional[float]:
        """Attention FLOPs by the FlashAttention convention: 4*B*H*N^2*D forward (two matmuls), halved when
        causal; forward+backward is 3.5x forward (backward = 2.5x: five matmuls, one recomputes the scores).
        None for the memory-bound ops, which are reported in GB/s instead."""
        if self.op != "attention":
            return None
        fwd = 4.0 * self.batch * self.heads * self.length ** 2 * self.head_dim * (0.5 if self.causal else 1.0)
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def as_record(self) -> dict:
        return asdict(self)


@dataclass
class Inputs:
    """Arguments for a provider's function (tensors and flags), and the upstream gradient for the backward."""

    args: tuple
    grad_out: Optional[torch.Tensor]

    @property
    def tensors(self) -> List[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor)]


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Random inputs for ``case`` (leaves requiring grad when the mode has a backward)."""
    dtype, grad = case.torch_dtype, case.mode == "fwd+bwd"

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    n = case.length
    if case.op == "attention":
        args = (randn(*case.shape), randn(*case.shape), randn(*case.shape), case.causal)
    elif case.op == "softmax":
        args = (randn(*case.shape),)
    elif case.op == "layer_norm":
        args = (randn(*case.shape), randn(n), randn(n))
    else:
        args = (randn(*case.shape), randn(n))
    grad_out = torch.randn(case.shape, device=device, dtype=dtype) if grad else None
    return Inputs(args, grad_out)


# ---- the provider table --------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A provider cannot run in this process; the message says why."""


@dataclass(frozen=True)
class Provider:
    """``load()`` returns ``fn(*Inputs.args) -> output`` or raises :class:`Unavailable`."""

    name: str
    op: str
    load: Callable[[], Callable]
    triton: bool = False  # runs Triton kernels (interpreted, hence slow, on CPU)
    baseline: bool = False  # the reference every ratio is taken against
    variant: bool = False  # a masking variant of another provider's kernel: the scaling profile's, not the suite's
    compiles: bool = False  # its first call at each input shape compiles: run once there before time and memory
    attention_kernels: bool = False  # launches the fused attention kernels (semi-fused launches softmax only)
    visible_pairs: Optional[Callable[[int], int]] = None
    """For a mask sparser than causal: the (query, key) pairs it keeps at length N, which its TFLOPS count."""

    def resolve(self) -> Callable:
        try:
            return self.load()
        except (ImportError, AttributeError) as error:
            raise Unavailable(f"{type(error).__name__}: {error}") from error


def _kernel(name: str) -> Callable:
    """``kernels.<name>``: AttributeError (hence unavailable) until the package exports it."""
    return getattr(importlib.import_module("kernels"), name)


def _semi_fused():
    softmax = _kernel("softmax")

    def semi_fused(q, k, v, causal):
        return softmax(q @ k.transpose(-2, -1), scale=1.0 / math.sqrt(q.shape[-1]), causal=causal) @ v

    return semi_fused


def _fused():
    attention = _kernel("attention")
    return lambda q, k, v, causal: attention(q, k, v, causal=causal)


def _fused_window():
    attention = _kernel("attention")
    return lambda q, k, v, causal: attention(q, k, v, causal=causal, window_size=(WINDOW - 1, 0))


def _fused_documents():
    attention_varlen = importlib.import_module("kernels.attention.varlen").attention_varlen

    def documents(q, k, v, causal):
        batch, heads, n, d = q.shape
        if n % DOCUMENTS:
            raise ValueError(f"length {n} is not a multiple of {DOCUMENTS} documents")
        # (B, H, N, D) -> packed (B * N, H, D) tokens: a view for batch 1, a copy otherwise
        packed = [t.transpose(1, 2).reshape(batch * n, t.shape[1], d) for t in (q, k, v)]
        cu_seqlens = torch.arange(0, batch * n + 1, n // DOCUMENTS, dtype=torch.int32, device=q.device)
        out = attention_varlen(*packed, cu_seqlens, cu_seqlens, n // DOCUMENTS, n // DOCUMENTS, causal=causal)
        return out.view(batch, n, heads, d).transpose(1, 2)

    return documents


def _window_pairs(n: int) -> int:
    """Query i sees keys max(0, i - WINDOW + 1) .. i: i + 1 of them up to WINDOW."""
    full = min(n, WINDOW)
    return full * (full + 1) // 2 + (n - full) * WINDOW


def _document_pairs(n: int) -> int:
    length = n // DOCUMENTS
    return DOCUMENTS * length * (length + 1) // 2


def _flash_attn():
    if not torch.cuda.is_available():
        raise Unavailable("flash-attn needs a CUDA GPU")
    from flash_attn import flash_attn_func  # optional dependency

    # flash-attn takes (B, N, H, D); the transposed views keep the last dim contiguous, so nothing is copied.
    return lambda q, k, v, causal: flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def _norm(fn):
    return lambda x, *params: fn(x, (x.shape[-1],), *params)


def compiled_per_shape(eager: Callable, backend) -> Callable:
    """``eager`` under ``torch.compile``, compiled afresh with static shapes for each new input shape: dynamo's
    recompile limit would otherwise fall back to eager after a few shapes, and say so only in a log. While
    ``benchmarks.counting`` counts bytes it runs eager (the bytes are eager's): under a dispatch mode dynamo would
    skip this code for good, and every later call would run eager."""
    current = {}

    def compiled(*args):
        if _get_current_dispatch_mode() is not None:
            return eager(*args)
        key = [(a.shape, a.dtype, a.requires_grad) for a in args]
        if current.get("key") != key:
            torch._dynamo.reset()  # also frees the previous shape's graphs
            current.update(key=key, fn=torch.compile(eager, dynamic=False, backend=backend))
        return current["fn"](*args)

    return compiled


def _compiled(fn):
    """``fn`` (torch's own op) under ``torch.compile``, per shape: inductor on a GPU; on CPU the ``aot_eager``
    backend, which traces the same graph without generating C++ (an interpreted run's timings say nothing about a
    GPU anyway, and it keeps the suite's CPU run short)."""
    return compiled_per_shape(fn, "inductor" if torch.cuda.is_available() else "aot_eager")


PROVIDERS = (
    Provider("baseline", "attention",
             lambda: lambda q, k, v, causal: reference.attention(q, k, v, causal=causal), baseline=True),
    Provider("semi-fused", "attention", _semi_fused, triton=True),
    Provider("triton", "attention", _fused, triton=True, attention_kernels=True),
    Provider(f"triton-window{WINDOW}", "attention", _fused_window, triton=True, attention_kernels=True,
             variant=True,
             visible_pairs=_window_pairs),
    Provider(f"triton-{DOCUMENTS}docs", "attention", _fused_documents, triton=True, attention_kernels=True,
             variant=True,
             visible_pairs=_document_pairs),
    Provider("torch-sdpa", "attention",
             lambda: lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
    Provider("flash-attn", "attention", _flash_attn),
    Provider("naive", "softmax", lambda: reference.softmax, baseline=True),
    Provider("torch", "softmax", lambda: lambda x: torch.softmax(x, dim=-1)),
    Provider("torch.compile", "softmax", lambda: _compiled(lambda x: torch.softmax(x, dim=-1)), compiles=True),
    Provider("triton", "softmax", lambda: _kernel("softmax"), triton=True),
    Provider("naive", "layer_norm", lambda: _norm(reference.layer_norm), baseline=True),
    Provider("torch", "layer_norm", lambda: _norm(F.layer_norm)),
    Provider("torch.compile", "layer_norm", lambda: _compiled(_norm(F.layer_norm)), compiles=True),
    Provider("triton", "layer_norm", lambda: _norm(_kernel("layer_norm")), triton=True),
    Provider("naive", "rms_norm", lambda: _norm(reference.rms_norm), baseline=True),
    Provider("torch", "rms_norm", lambda: _norm(F.rms_norm)),
    Provider("torch.compile", "rms_norm", lambda: _compiled(_norm(F.rms_norm)), compiles=True),
    Provider("triton", "rms_norm", lambda: _norm(_kernel("rms_norm")), triton=True),
)


def providers_for(op: str, names: Optional[List[str]] = None, variants: bool = False) -> List[Provider]:
    """The providers of ``op``, baseline first: those named, else all (the masking variants only if ``variants``)."""
    chosen = [p for p in PROVIDERS if p.op == op and (p.name in names if names else variants or not p.variant)]
    return sorted(chosen, key=lambda p: not p.baseline)


def provider(op: str, name: str) -> Provider:
    for p in PROVIDERS:
        if p.op == op and p.name == name:
            return p
    raise ValueError(f"no provider {name!r} for op {op!r}")
