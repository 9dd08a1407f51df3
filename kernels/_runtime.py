"""Where the Triton kernels run: compiled on a CUDA/ROCm GPU, or through Triton's interpreter on CPU.

Triton decides at decoration time whether ``@triton.jit`` builds a GPU kernel or an interpreted one, and it
reads ``TRITON_INTERPRET`` when ``triton`` is first imported. So this module must be imported before
``triton`` (``kernels/__init__.py`` does that): on a machine without a GPU it turns the interpreter on,
unless the user already set ``TRITON_INTERPRET`` themselves.

If ``triton`` was imported before ``kernels`` on a machine without a GPU, the kernels are compiled for a GPU
that does not exist. Rather than crash deep inside Triton, the launchers then fall back to the plain-PyTorch
reference in ``kernels/reference.py`` and say so once with a warning (see :func:`kernel_runs_on`).

It also checks, first, that the ``kernels`` being imported is this package: Hugging Face's hub kernels have the same
import name (see :func:`check_import_name`).
"""
import contextlib
import functools
import importlib.metadata
import inspect
import os
import sys
import threading
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._subclasses.fake_tensor import FakeTensor

DISTRIBUTION = "transformer-kernels"
"""This package's distribution (setup.py); ``kernels/__init__.py`` sets it as ``__distribution__`` before it imports
this module."""
HUB_KERNELS = "kernels"
"""The distribution of Hugging Face's hub kernels, whose import name is ``kernels`` too (transformers imports it
where ``is_kernels_available()``)."""
_REMEDY = ("Install them into separate virtualenvs, or uninstall one (`pip uninstall kernels` for Hugging Face's, "
           f"`pip uninstall {DISTRIBUTION}` for this one) and reinstall the other.")


def _hub_kernels():
    """Hugging Face's hub kernels, named with their version and directory, where their distribution is installed;
    else None."""
    try:
        hub = importlib.metadata.distribution(HUB_KERNELS)
    except importlib.metadata.PackageNotFoundError:
        return None
    return f'"{HUB_KERNELS}" {hub.version} (Hugging Face\'s hub kernels, in {os.path.abspath(hub.locate_file(""))})'


def check_import_name(package) -> None:
    """ImportError if ``package`` (the ``kernels`` module this file is imported under) is not this distribution's:
    another ``kernels/__init__.py`` over this package's files, left where pip installed both into one directory.
    RuntimeWarning if Hugging Face's hub kernels are installed beside this package: one shadows the other.

    Runs at every import, so it looks up one distribution by name (under a millisecond) rather than calling
    ``importlib.metadata.packages_distributions()``, which reads the file lists of every installed distribution.
    """
    hub = _hub_kernels()
    if getattr(package, "__distribution__", None) != DISTRIBUTION:
        raise ImportError(f"`import kernels` found {getattr(package, '__file__', package)}, which is not the package "
                          f"of {DISTRIBUTION}, yet a module of {DISTRIBUTION} ({os.path.abspath(__file__)}) is "
                          f"imported under it: {hub or 'another package named kernels'} has overwritten or shadows "
                          f"{DISTRIBUTION}, and both use the import name `kernels`. {_REMEDY}")
    if hub is not None:
        site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        warnings.warn(f"{hub} is installed beside {DISTRIBUTION} (in {site}): both use the import name `kernels`, "
                      f"so one shadows or overwrites the other; `import kernels` gives {DISTRIBUTION} here, and "
                      f"transformers' hub-kernel integrations would import it too (transformers 5.25 and later "
                      f"require the hub kernels and fail to build a model beside {DISTRIBUTION}: keep "
                      f"transformers<5.25 with it). {_REMEDY}", RuntimeWarning,
                      stacklevel=2)


check_import_name(sys.modules.get(__name__.rpartition(".")[0]))

if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (must come after the interpreter choice above)
import triton.language as tl  # noqa: E402


@triton.jit
def _probe(x):
    tl.store(x, 0)


INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
"""True when every ``@triton.jit`` kernel of this process runs on CPU tensors through Triton's interpreter."""

_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even, as a GPU converts fp32 -> bf16.

    Interpreter trap (triton 3.8): the interpreter truncates fp32 -> bf16 (up to 1 ulp off). When interpreted,
    round the fp32 bits to the nearest even bf16 first, so the conversion that follows is exact.
    """
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN's carry could make it inf or +-0
    return x.to(dtype)

_warned = set()


_TENSOR = torch.Tensor


def kernels_can_run(*tensors: torch.Tensor) -> bool:
    """Whether the kernels of this process take these tensors: CPU tensors when interpreted, GPU ones when compiled,
    but no eager fake tensor (:func:`holds_no_data`), and no call that make_fx records (:func:`traced_by_make_fx`)."""
    # a loop rather than all(<generator>): this runs on every call of every op, and the generator costs more;
    # is_cpu/is_cuda rather than device.type, which builds a device and a string per tensor; a plain tensor's exact
    # type spares it the fake tensor's test
    for t in tensors:
        if (not t.is_cpu if INTERPRETED else not t.is_cuda) or type(t) is not _TENSOR and holds_no_data(t):
            return False
    return not traced_by_make_fx()


_dispatch_modes = torch._C._len_torch_dispatch_stack
_PROXY_MODE = torch._C._TorchDispatchModeKey.PROXY


# dynamo cannot trace the dispatch-stack reads, and while it traces no make_fx records (under torch.compile the
# custom ops' fake implementations meet make_fx instead): a constant there
@torch.compiler.assume_constant_result
def traced_by_make_fx() -> bool:
    """Whether make_fx's proxy mode records this eager call (``torch.func.linearize``, ``make_fx`` of a function
    calling the ops): it records torch's ops but cannot see into a Triton launch, which would fail on its tensors.
    About 0.1 µs (one read of the dispatch-mode stack) where no mode is active."""
    return _dispatch_modes() > 0 and torch._C._get_dispatch_mode(_PROXY_MODE) is not None


def holds_no_data(t: torch.Tensor) -> bool:
    """Whether ``t`` has a shape but no data: a meta tensor, or a fake tensor of ``FakeTensorMode`` run eagerly (it
    claims a CPU or GPU device, but a launch on it fails inside torch). A fake tensor while torch.compile or
    torch.export traces is not: the custom ops take it there (their fake implementations)."""
    return t.is_meta or isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def kernel_runs_on(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors in this process.

    Interpreted kernels take CPU tensors; compiled kernels take GPU tensors. Anything else (CPU tensors with
    compiled kernels, because ``triton`` was imported before ``kernels`` without a GPU; GPU tensors with the
    interpreter forced on) makes the caller use the reference implementation, with a one-time warning; meta
    and eager fake tensors (:func:`holds_no_data`) do too, silently (the reference's torch ops give the results'
    shapes), and so does every call under ``torch.jit.trace``, which records torch's ops (a launch's sizes would
    be traced as tensors).
    """
    if kernels_can_run(*tensors):
        return not torch.jit.is_tracing()  # (torch._C._is_tracing: dynamo cannot trace it)
    if any(holds_no_data(t) for t in tensors) or traced_by_make_fx():
        return False  # no data to compute on (shape propagation), or a trace: nothing is wrong, nothing to warn about
    reason = (
        f"kernels: Triton kernels are {'interpreted' if INTERPRETED else 'compiled for a GPU'} in this process "
        f"but the inputs are on {tensors[0].device}; using the plain-PyTorch reference instead. "
        "(On a machine without a GPU, import `kernels` before `triton`, or set TRITON_INTERPRET=1.)"
    )
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return False


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device):
    """(major, minor) compute capability of a CUDA device, or None on CPU/interpreter. Queried lazily, once per
    device."""
    if INTERPRETED or device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (queried once per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def kernel_device(device, what: str) -> torch.device:
    """``device`` (None: where this process's kernels run) as an indexed torch.device; TypeError/ValueError naming
    ``what``'s ``device`` unless it parses and the kernels of this process run there."""
    kernel_type = "cpu" if INTERPRETED else "cuda"
    try:
        parsed = torch.device(kernel_type if device is None else device)
    except (RuntimeError, TypeError) as error:  # torch's messages name neither the function nor device
        raise (ValueError if isinstance(error, RuntimeError) else TypeError)(
            f"{what}: device must be a torch.device, a device string or an index, got {device!r}") from None
    if parsed.type != kernel_type:
        raise ValueError(f"{what}: device must be where the Triton kernels of this process run "
                         f"({kernel_type}{', interpreted' if INTERPRETED else ''}), got device={parsed}")
    if parsed.type == "cuda" and parsed.index is None:  # compare equal to the inputs' (indexed) device
        parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


# Host integer math for launch plans: Triton's own cdiv / next_power_of_2 are constexpr functions that cost about
# 2 µs a call on the host, more than the rest of a small launch's plan.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


_INTERPRETER_LOCK = threading.RLock()
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def launch_device(t: torch.Tensor):
    """Context in which kernels for ``t`` launch: Triton launches on the *current* CUDA device, so make it ``t``'s
    (inputs on cuda:1 while cuda:0 is current would otherwise run on the wrong GPU). On CPU it holds a process-wide
    lock instead: Triton's interpreter patches ``triton.language`` while a kernel runs, so two threads launching
    at once break each other."""
    if t.is_cuda:
        index = t.device.index
        return _NO_CONTEXT if index is None or index == torch.cuda.current_device() else torch.cuda.device(index)
    return _INTERPRETER_LOCK if INTERPRETED else _NO_CONTEXT


def forward_ad_active() -> bool:
    """Whether any tensor can carry a forward-mode tangent here: inside ``forward_ad.dual_level()`` or a torch.func
    transform. Two flag reads, so the eager paths skip unpacking every input's dual outside them."""
    return fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active()


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jacfwd, vmap, ...) runs this call: its tensors are
    functorch wrappers, which a Triton launch cannot read, and neither can the custom ops' autograd while
    torch.compile traces a transform (torch's 'must override the setup_context' error); torch.compile's own
    tracing activates none. One flag read outside transforms."""
    return torch._C._are_functorch_transforms_active()


def functorch_levels(kind: TransformType) -> int:
    """How many torch.func levels of ``kind`` (``TransformType.Vmap``, ``.Jvp``, ...) are active around this call."""
    return sum(level.key() == kind for level in retrieve_all_functorch_interpreters())


def nested_forward_ad() -> bool:
    """Whether torch.func.jvp levels nest around this call (a jvp of a jvp): torch gives an autograd.Function's
    jvp no tangent of its saved tensors at the outer level, so the row ops' second forward-mode derivative would
    come out zero; they run torch's ops there, which nest. Two flag reads outside forward-mode AD."""
    return forward_ad_active() and functorch_levels(TransformType.Jvp) > 1


def transform_needs_torch_ops() -> bool:
    """Whether a torch.func transform around this call needs torch's ops rather than the row kernels: an eager
    torch.vmap level (torch.vmap, jacfwd, ...), whose batched tensors cannot go to a Triton launch, or any transform
    while torch.compile traces (the custom ops' autograd does not take one: 'must override the setup_context'; and
    dynamo cannot read the transform stack)."""
    if not in_functorch_transform():
        return False
    return torch.compiler.is_compiling() or functorch_levels(TransformType.Vmap) > 0


def refuse_forward_ad(op: str, *tensors) -> None:
    """NotImplementedError if any tensor carries a forward-mode tangent (``torch.func.jvp`` or
    ``torch.autograd.forward_ad``): the custom ops define reverse mode only, and would otherwise return an all-zero
    tangent without a word."""
    if not forward_ad_active():
        return
    if any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{called_op(op)}: forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) is "
                                  "not implemented by the fused kernels; use reverse mode, or kernels.reference's op")


def called_op(op: str) -> str:
    """The public function of this package that the user called, for an error raised inside ``op``: the outermost
    call on the stack of a function the package or one of its modules exports (``kernels.flash_attn.flash_attn_func``
    rather than the ``kernels.attention`` it calls); ``op`` where there is none. A stack walk: for errors only."""
    package = __name__.rpartition(".")[0]
    top = sys.modules[package]
    frame = sys._getframe(1)
    while frame is not None:
        code, module = frame.f_code, frame.f_globals.get("__name__", "")
        if module.startswith(package + ".") and module != __name__ and not code.co_name.startswith("_"):
            if _code(getattr(top, code.co_name, None)) is code:
                op = f"{package}.{code.co_name}"
            elif _code(frame.f_globals.get(code.co_name)) is code:
                op = f"{module}.{code.co_name}"
        frame = frame.f_back
    return op


def _code(fn):
    """The code object of ``fn`` under its decorators (``torch.compiler.disable``'s, ``functools.wraps``'), or None."""
    return getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
