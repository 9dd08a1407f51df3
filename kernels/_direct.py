"""Launching a compiled Triton kernel again without ``JITFunction.run``'s argument binder (GPU launches only).

``kernel[grid](*args)`` runs ``JITFunction.run``, which before every launch binds and specialises each argument
(a tensor's dtype and 16-byte alignment, an int's value class: 1, a multiple of 16, its width), builds the cache key
from the options' string and looks the compiled kernel up. For attention's ~60 arguments the binder alone is
~11 µs of host time per launch as built for sm_90 (``python -m benchmarks launch-path``), more than the launch.

A launch whose arguments are the same as an earlier one's in every way the binder looks at (same tensor dtypes,
every pointer 16-byte aligned, the same ints, the same Nones, floats as floats, the same compile-time arguments
and options) gets the same specialisation, so the same compiled kernel. :class:`DirectLaunches` keeps, per such
signature (:meth:`DirectLaunches.key`), the kernel ``JITFunction.run`` returned for it, and launches it again the
way ``run``'s last two lines do (``launch_metadata``, then the compiled kernel's ``run`` with the grid, the
current stream, the launch hooks and every argument in the signature's order). Anything the key does not cover
(a misaligned pointer, a tensor subclass other than ``nn.Parameter``, a tuple or descriptor argument, arguments by
keyword, a kernel with pre-run hooks) goes through ``JITFunction.run`` every time, and so does every launch where
the installed Triton's ``run`` does not end in those two lines, or whose backend specialises on more than the key
holds (AMD's, :func:`supported`): a version whose launch differs never reaches the direct path.

:func:`run` is ``jit.run`` with this memo, for every kernel family's launches (attention's autotuned ones use
:class:`DirectLaunches` in ``attention/configs.py``, which keeps each launch's tile with its kernel). The signature
also holds ``TRITON_DEBUG`` and a profiler's instrumentation mode, which ``run`` adds to every launch's options.
Written and checked on CPU against Triton's own binder (``tests/test_direct_launch.py``); not yet run on a GPU.
"""
import inspect
import os
from typing import Dict, NamedTuple, Optional

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from kernels import _runtime

_RUN_ENDS_WITH = (
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,",
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)
"""The lines of ``JITFunction.run`` that :meth:`DirectLaunches.launch` repeats (Triton 3.4 to 3.9)."""
_supported: Optional[bool] = None
MAX_SIGNATURES = 1024
"""Signatures kept per kernel; past it the memo starts again (a model repeats a handful)."""


SWITCH = "KERNELS_DIRECT_LAUNCH"
"""The environment variable that turns direct launches off when "0" (read once, at the first GPU launch)."""


def supported() -> bool:
    """Whether direct launches are on (read once): this Triton's ``JITFunction.run`` launches as
    :meth:`DirectLaunches.launch` does, the current GPU's backend specialises as :meth:`DirectLaunches.key` assumes
    (:func:`_specialises_as_the_key`), and :data:`SWITCH` does not turn them off."""
    global _supported
    if _supported is None:
        try:
            source = " ".join(inspect.getsource(JITFunction.run).split())
        except (OSError, TypeError):
            source = ""
        _supported = (os.environ.get(SWITCH, "1") != "0" and _specialises_as_the_key()
                      and all(" ".join(line.split()) in source for line in _RUN_ENDS_WITH))
    return _supported


def _specialises_as_the_key() -> bool:
    """Whether the current target's compiler backend specialises a tensor on its 16-byte alignment alone and an int
    on its value alone, Triton's defaults, which the key covers. AMD's does not: with buffer ops it also marks
    tensors whose storage fits in 2 GB (32-bit offsets), which the key does not hold, so it launches through run."""
    from triton.backends import backends
    from triton.backends.compiler import BaseBackend

    target = driver.active.get_current_target()
    compilers = [entry.compiler for entry in backends.values() if entry.compiler.supports_target(target)]
    return len(compilers) == 1 and all(
        getattr(compiler, "supports_native_tensor_specialization", False)
        and compiler.get_tensor_specialization is BaseBackend.get_tensor_specialization
        and compiler.get_int_specialization is BaseBackend.get_int_specialization for compiler in compilers)


class Entry(NamedTuple):
    """A remembered launch: the compiled kernel, the compile-time arguments' values in the signature's order (they
    follow the runtime ones), and what the caller keeps with it (its tile, say)."""
    compiled: object
    constexprs: tuple
    payload: object


_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


class DirectLaunches:
    """The compiled kernels of one ``@triton.jit`` function by launch signature, launched directly."""

    def __init__(self, jit):
        self.jit = jit
        # an interpreting process's kernels (the CPU tests' simulated GPU launches) keep theirs on a JITFunction
        params = jit.params if isinstance(jit, JITFunction) else JITFunction(jit.fn).params
        self.n_runtime = sum(not p.is_constexpr for p in params)
        # run passes every argument in the signature's order; the direct call appends the constexprs to the
        # runtime arguments, so it needs them last (else this kernel always goes through run)
        self.constexprs_last = all(p.is_constexpr for p in params[self.n_runtime:])
        self.constexpr_params = params[self.n_runtime:]
        self._entries = {}

    def key(self, args: tuple, *extra) -> Optional[tuple]:
        """The launch signature of positional runtime ``args`` (plus the caller's ``extra``, which must cover the
        compile-time arguments and options it will pass): the current device (where run would launch, and whose
        compiled kernel it would take), each tensor's (or Parameter's) dtype, each int, bool and None as it is,
        float for a float. None where the binder could specialise two such launches apart (a pointer not 16-byte
        aligned) or the key cannot tell (any other argument type, a different count), and while ``run`` does more
        than the direct launch repeats: the kernel has pre-run hooks, or a stages-inspection hook is set."""
        if len(args) != self.n_runtime or not self.constexprs_last or self.jit.pre_run_hooks or getattr(
                knobs.runtime, "add_stages_inspection_hook", None) is not None:
            return None  # run calls the kernel's pre-run hooks, and keys its cache on the stages hook's hash
        spec, pointers = [], 0
        for arg in args:
            kind = type(arg)
            if kind is _TENSOR or kind is _PARAMETER:  # the binder takes a Parameter as the tensor it is
                spec.append(arg.dtype)
                pointers |= arg.data_ptr()
            elif kind is int or arg is None:
                spec.append(arg)
            elif kind is float:  # the binder does not specialise on a float's value
                spec.append(float)
            elif kind is bool:  # True == 1 as a key: kept apart
                spec.append((bool, arg))
            else:
                return None
        if pointers % 16:
            return None
        # and the two process-wide options run adds to every launch's (TRITON_DEBUG, a profiler's instrumentation)
        return (driver.active.get_current_device(), tuple(spec), knobs.runtime.debug,
                knobs.compilation.instrumentation_mode, *extra)

    def get(self, key: Optional[tuple]) -> Optional[Entry]:
        """The launch remembered for ``key`` (None: not seen, no key, or one holding an unhashable compile-time
        argument, which has no signature)."""
        if key is None:
            return None
        try:
            return self._entries.get(key)
        except TypeError:
            return None

    def run(self, key: Optional[tuple], args: tuple, grid: tuple, payload: object = None, **kwargs):
        """``jit.run(*args, grid=grid, warmup=False, **kwargs)``, remembering its compiled kernel for ``key`` (with
        ``payload``) where there is one and this Triton launches as :meth:`launch` does."""
        compiled = self.jit.run(*args, grid=grid, warmup=False, **kwargs)
        if key is not None and compiled is not None and supported():
            constexprs = tuple(kwargs.get(p.name, p.default) for p in self.constexpr_params)
            if all(value is not inspect.Parameter.empty for value in constexprs):  # each given, or a default
                if len(self._entries) >= MAX_SIGNATURES:
                    self._entries.clear()
                try:
                    self._entries[key] = Entry(compiled, constexprs, payload)
                except TypeError:  # an unhashable compile-time argument: no signature, launched through run
                    pass
        return compiled

    @staticmethod
    def launch(key: tuple, entry: Entry, args: tuple, grid: tuple) -> None:
        """Launch ``entry`` (remembered for ``key``) on ``args`` over ``grid`` (1 to 3 ints) on the key's device's
        (the current one's) current stream, as ``JITFunction.run`` would."""
        compiled = entry.compiled
        stream = driver.active.get_current_stream(key[0])
        arguments = (*args, *entry.constexprs)
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        launch_metadata = compiled.launch_metadata(grid, stream, *arguments)
        compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, launch_metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *arguments)


_LAUNCHES: Dict[object, DirectLaunches] = {}
"""The :class:`DirectLaunches` of each kernel :func:`run` has launched."""


def run(jit, args: tuple, grid: tuple, **kwargs) -> None:
    """``jit.run(*args, grid=grid, warmup=False, **kwargs)`` (the launch ``jit[grid](*args, **kwargs)`` makes, without
    its wrapper's repacking), or on a GPU, for a launch made before with the same signature and the same ``kwargs``
    (compile-time arguments and options), a direct launch of its compiled kernel. ``args``: every runtime argument,
    by position."""
    if _runtime.INTERPRETED:  # nothing compiled to keep: the interpreter runs the Python function
        jit.run(*args, grid=grid, warmup=False, **kwargs)
        return
    direct = _LAUNCHES.get(jit) or _LAUNCHES.setdefault(jit, DirectLaunches(jit))
    key = direct.key(args, *kwargs.items())
    seen = direct.get(key)
    if seen is not None:
        direct.launch(key, seen, args, grid)
        return
    direct.run(key, args, grid, **kwargs)
