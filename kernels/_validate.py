"""Input checks shared by the launchers: bad input raises a clear error before any kernel launches."""
import numbers

import torch
from torch._subclasses.fake_tensor import FakeTensor

from kernels._rows import DTENSOR

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTENSOR_TYPES = () if DTENSOR is None else (DTENSOR,)
"""isinstance's second argument for a DTensor: empty where torch has none (isinstance(t, ()) is False)."""


class DimError(ValueError, IndexError):
    """A ``dim`` argument out of range: a ValueError, this package's error for a bad argument, and an IndexError,
    torch's ("Dimension out of range"), so code written to catch either catches it (numpy's AxisError does the
    same)."""


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is an ordinary strided tensor, as the kernels read one (a data pointer and strides): not
    sparse, nested (whose ``.shape`` raises) or of another layout."""
    return t.layout is torch.strided and not t.is_nested


def refuse_dtensor(name: str, t, instead: str = "") -> None:
    """TypeError naming ``name`` for a DTensor, before anything runs on it: a launch reads a tensor's own memory,
    which a DTensor (a global value, each rank holding a local shard) has none of. The message says to pass
    ``instead`` (default: this rank's shard, ``.to_local()``, or the whole tensor, ``.full_tensor()``)."""
    if isinstance(t, DTENSOR_TYPES):
        instead = instead or f"{name}.to_local() (this rank's shard) or {name}.full_tensor() (the whole tensor)"
        raise TypeError(f"{name} must be a plain torch.Tensor, got a DTensor (placements {tuple(t.placements)}): "
                        f"pass {instead}")


def check_tensor(name: str, t, *, ndim=None, dtypes=FLOAT_DTYPES) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a dense tensor of a supported dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not is_dense(t):
        kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def is_integer(value) -> bool:
    """Whether ``value`` is an integer as torch takes one for a dim or a size: an int or an integer scalar (numpy's
    included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_size(owner: str, name: str, size, optional: bool = False) -> None:
    """TypeError naming ``owner``'s ``name`` unless ``size`` is an int (:func:`is_integer`; or None where
    ``optional``), ValueError if negative: torch's rule for a size (``torch.empty(2.0)`` is a TypeError)."""
    if optional and size is None:
        return
    if not is_integer(size) or size < 0:
        raise (ValueError if is_integer(size) else TypeError)(
            f"{owner}: {name} must be a non-negative int{' or None' if optional else ''}, got {size!r}")


def check_same(what: str, **tensors) -> None:
    """Raise unless all named tensors share the same dtype (``what="dtype"``) or device (``what="device"``)."""
    expected = None
    for t in tensors.values():  # the common case, all equal, builds no dict or set
        value = getattr(t, what)
        if expected is None:
            expected = value
        elif value != expected:
            break
    else:
        return
    values = {name: getattr(t, what) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name}: {value}" for name, value in values.items())
        error = TypeError if what == "dtype" else ValueError
        raise error(f"{', '.join(values)} must share one {what}, got {listed}")


_FEW = 8
"""Elements up to which a CPU condition is read as a list: cheaper than ``all()`` (a tensor op) and then a read."""


def assert_on_device(cond: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless every element of ``cond`` (bool, or ints: nonzero is true) is true,
    without a host sync.

    A CPU tensor is read at once (reading it costs no sync), so the error is raised here; on an accelerator
    ``torch._assert_async`` fails the stream with ``message`` (a device assert) instead of stopping to read it.
    Call it before any launch that the check guards, so that a failing check on CPU leaves every tensor as it was.
    """
    if cond.is_cpu and not isinstance(cond, FakeTensor):  # (a fake tensor has no values to read: as compiled)
        if cond.dim() == 1 and cond.numel() <= _FEW:
            ok = all(cond.tolist())
        else:
            ok = bool(cond.all())
        if not ok:
            raise ValueError(message)
    else:
        torch._assert_async(cond.all(), message)
