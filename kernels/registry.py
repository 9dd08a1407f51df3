"""One list of the package's GPU builds: every (Triton kernel, launch configuration) the launchers can choose.

A kernel module registers its builds once with :func:`register_builds`; the GPU-target build report
(``python -m benchmarks static``) and its tests compile each of them ahead of time for real GPU targets, so a new
kernel or autotune config is built and checked everywhere without being listed twice.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
"""Triton's pointer-type names of the dtypes the kernels take, for build signatures."""


@dataclass(frozen=True)
class Build:
    """One ahead-of-time compilation of a ``@triton.jit`` function.

    ``signature`` maps every parameter name, in order, to a Triton type ("*fp16", "i32", "fp32", ...) or
    "constexpr"; ``constexprs`` gives the constexpr values; ``divisible_by_16`` names the pointer/int params the
    launcher may assume 16-aligned (as Triton's own specialisation would); ``label`` says what the config is
    for (dtype, head dim, tile sizes) in the report.
    """

    kernel: str
    fn: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    label: str
    divisible_by_16: tuple = field(default_factory=tuple)


_providers: List[Callable[[], List[Build]]] = []


def register_builds(provider: Callable[[], List[Build]]) -> Callable[[], List[Build]]:
    """Register a zero-argument function returning a module's builds (usable as a decorator)."""
    _providers.append(provider)
    return provider


def all_builds() -> List[Build]:
    """Every registered build of every kernel module that ``kernels`` imports."""
    import kernels  # noqa: F401  (importing the package imports every kernel module, which registers them)

    return [build for provider in _providers for build in provider()]
