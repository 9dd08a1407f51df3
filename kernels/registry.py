"""One list of the package's GPU builds, one way to declare them, and one seam to pick a launch configuration.

A kernel module declares its builds once, with :func:`declare` inside a function decorated by
:func:`register_builds`; the GPU-target build report (``python -m benchmarks static``), its tests and the GPU check
(``python -m benchmarks gpu-check``) compile or run each of them, so a new kernel or autotune config is built and
checked everywhere without being listed twice.

:func:`use_config` is the one seam through which a caller outside the launchers (tests, benchmarks, the GPU check)
chooses the configuration of a launch: every launcher that autotunes or has a tile table (attention's and
decoding's, :data:`FORCEABLE`) asks :func:`forced_config` before it autotunes (on a GPU) or takes its interpreter
default (on CPU).
"""
import contextlib
import contextvars
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
"""Triton's pointer-type names of the dtypes the kernels take, for build signatures."""


@dataclass(frozen=True)
class Build:
    """One ahead-of-time compilation of a ``@triton.jit`` function.

    ``signature`` maps every parameter name, in order, to a Triton type ("*fp16", "i32", "fp32", ...), a tuple of
    them (a tuple argument, e.g. ``("*i32", "i32")``) or "constexpr"; ``constexprs`` gives the constexpr values;
    ``divisible_by_16`` names the pointer/int params the launcher may assume 16-aligned (as Triton's own
    specialisation would); ``dtype`` is the Triton name of the element type it was declared for ("fp16", "bf16",
    "fp32", "u8", ...), ``head_dim`` its attention head dim (None for a kernel without one) and ``variant`` the
    specialisation it was built with ("window", "dropout", "rms", "causal", ...; "" for the plain kernel);
    ``label`` is the human-readable text of the report and nothing reads fields back out of it;
    ``default`` marks the config a GPU runs first (the first of its autotune list), which the build report holds
    to the no-spill bar; ``families`` narrows that to the GPU families (compute capability x 10: 80, 90) whose
    launches try it first, when families have tables of their own (empty: every family).
    """

    kernel: str
    fn: Callable
    signature: Dict[str, Union[str, Tuple[str, ...]]]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    label: str
    dtype: str
    head_dim: Optional[int] = None
    variant: str = ""
    divisible_by_16: tuple = field(default_factory=tuple)
    default: bool = False
    families: Tuple[int, ...] = ()


def declare(kernel: str, fn, *, dtype: str, constexprs: Dict[str, object], num_warps: int, num_stages: int,
            label: str, head_dim: Optional[int] = None, variant: str = "",
            types: Optional[Dict[str, Union[str, Tuple[str, ...]]]] = None,
            default: bool = False, families: Tuple[int, ...] = ()) -> Build:
    """A :class:`Build` of ``fn`` whose signature follows the package's naming convention.

    Parameters in ``constexprs`` are constexpr; ``types`` overrides any parameter's type (a tuple of types for a
    tuple argument); otherwise an UPPERCASE parameter is a pointer to ``dtype`` ("fp16", "bf16", "fp32"), a
    ``stride_*`` one an i32 (a unit head-dim or column stride, named ``stride_*d``, is specialised to the constant 1
    as Triton does), a name containing ``scale`` or ``eps`` an fp32, and every other lowercase scalar an i32.
    Pointers and non-unit strides are taken as 16-aligned, as Triton's own specialisation would for contiguous
    tensors (not those inside a tuple argument, which ``divisible_by_16`` cannot name). ``dtype``, ``head_dim``
    and ``variant`` are kept as the build's fields; ``head_dim`` must agree with a ``HEAD_DIM`` constexpr where
    ``constexprs`` has one (ValueError otherwise).
    """
    if "HEAD_DIM" in constexprs and constexprs["HEAD_DIM"] != head_dim:
        raise ValueError(f"{kernel}: head_dim={head_dim!r} differs from its HEAD_DIM constexpr "
                         f"{constexprs['HEAD_DIM']!r}")
    python_fn = fn
    while hasattr(python_fn, "fn"):  # Autotuner -> JITFunction -> the Python function
        python_fn = python_fn.fn
    types = types or {}
    signature, values = {}, dict(constexprs)
    for name in inspect.signature(python_fn).parameters:
        if name in values:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.startswith("stride_") and name.endswith("d") and len(name) > len("stride_d"):
            signature[name], values[name] = "constexpr", 1
        elif name.isupper() or name[0].isupper():
            signature[name] = f"*{dtype}"
        elif "scale" in name or name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    aligned = tuple(n for n, t in signature.items()
                    if isinstance(t, str) and (t.startswith("*") or (t == "i32" and n.startswith("stride_"))))
    return Build(kernel=kernel, fn=fn, signature=signature, constexprs=values, num_warps=num_warps,
                 num_stages=num_stages, label=label, dtype=dtype, head_dim=head_dim,
                 variant=variant, divisible_by_16=aligned, default=default, families=families)


_providers: List[Callable[[], List[Build]]] = []


def register_builds(provider: Callable[[], List[Build]]) -> Callable[[], List[Build]]:
    """Register a zero-argument function returning a module's builds (usable as a decorator)."""
    _providers.append(provider)
    return provider


def all_builds() -> List[Build]:
    """Every registered build of every kernel module that ``kernels`` imports."""
    import kernels  # noqa: F401  (importing the package imports every kernel module, which registers them)

    return [build for provider in _providers for build in provider()]


# ----------------------------------------------------------------------------------- the launch-config seam
_FORCED: contextvars.ContextVar = contextvars.ContextVar("forced_configs")
_ever_forced = False  # whether use_config has been entered in this process: else no launch looks further
_is_key_in_tls = getattr(torch._C, "_is_key_in_tls", None)

FORCEABLE: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {}
"""{kernel: (the keys a forced config must give, the keys it may give)} of every kernel whose launcher asks
:func:`forced_config`, as each launcher's module declares them (:func:`forceable`); the other builds (softmax, the
norms: their config follows from the row width) take none."""


def forceable(kernel: str, required: Tuple[str, ...] = (), optional: Tuple[str, ...] = ()) -> str:
    """Declare, beside its launcher, that ``kernel`` takes a forced config (:func:`use_config`) giving every key of
    ``required`` and any of ``optional``; returns ``kernel``."""
    FORCEABLE[kernel] = (tuple(required), tuple(optional))
    return kernel


def _check_config(kernel: str, config: Dict[str, object]) -> None:
    """ValueError/TypeError naming the kernel or key unless ``config`` is one the launcher of ``kernel`` takes:
    a launch would otherwise fail deep inside Triton (a missing or misspelt tile size, a block that is no power of
    two), or a misspelt kernel be ignored without a word."""
    if kernel not in FORCEABLE:
        raise ValueError(f"use_config: kernel must be one of {sorted(FORCEABLE)} (the launchers that take a forced "
                         f"config), got {kernel!r}")
    required, optional = FORCEABLE[kernel]
    unknown = sorted(set(config) - set(required) - set(optional))
    missing = [key for key in required if key not in config]
    if unknown or missing:
        needed = f" ({', '.join(required)} required)" if required else ""
        raise ValueError(f"use_config({kernel!r}): takes {', '.join(required + optional)}{needed}, got "
                         f"{', '.join(map(repr, config)) or 'nothing'}")
    for key, value in config.items():
        if key == "TMA":
            if not isinstance(value, bool):
                raise TypeError(f"use_config({kernel!r}): TMA must be a bool, got {value!r}")
        elif (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
              or (key != "num_stages" and value & (value - 1))):
            raise ValueError(f"use_config({kernel!r}): {key} must be a positive int"
                             f"{'' if key == 'num_stages' else ' power of two'}, got {value!r}")


@contextlib.contextmanager
def use_config(kernel: str, **config) -> Iterator[None]:
    """Launch ``kernel`` (a :attr:`Build.kernel` name, e.g. ``"attention_fwd"``) with ``config`` inside the block,
    bypassing the autotuner on a GPU and the interpreter's default tile on CPU.

    ``config`` holds the kernel's tile meta-parameters (e.g. ``BLOCK_M=64, BLOCK_N=32``) and optionally
    ``num_warps``/``num_stages`` (ignored by the interpreter); :data:`FORCEABLE` lists the kernels and keys
    (ValueError/TypeError for others, before anything launches). Blocks nest; the innermost wins per kernel.
    Meant for tests, benchmarks and the GPU check; the launchers never need it.
    """
    global _ever_forced
    _check_config(kernel, config)
    _ever_forced = True
    forced = dict(_FORCED.get({}))
    forced[kernel] = dict(config)
    token = _FORCED.set(forced)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_config(kernel: str) -> Optional[Dict[str, object]]:
    """The config :func:`use_config` forces on ``kernel`` (one of :data:`FORCEABLE`) here, or None (the launcher
    decides). Also inside the backward of a graph on a GPU, which the autograd engine runs on its device threads:
    their contexts are empty, so the configs come from the context ``backward()`` was called in, which torch
    hands those threads (stashed for AOTAutograd's compiled backward)."""
    forced = _FORCED.get(None)
    if forced is None:
        if not _ever_forced or _is_key_in_tls is None or not _is_key_in_tls("context"):
            return None
        launched = torch._C._get_obj_in_tls("context")
        forced = {} if launched is None else launched.get(_FORCED, {})
    return forced.get(kernel)
