"""Input checks shared by the launchers: bad input raises a clear error before any kernel launches."""
import numbers
from typing import Optional

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


def is_integer(value, tensor: bool = False) -> bool:
    """Whether ``value`` is an integer as torch takes one for a dim or a size: an int or an integer scalar (numpy's
    included), not a bool; with ``tensor`` also a 0-d tensor of an integer dtype (not bool), which torch reads on
    the host for a ``dim`` or an entry of a shape."""
    if isinstance(value, torch.Tensor):
        return (tensor and value.dim() == 0 and value.dtype is not torch.bool and not value.is_floating_point()
                and not value.is_complex())
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_int(name: str, value, low: Optional[int] = None, *, what: str = "an int", bound: Optional[str] = None,
              tensor: bool = False) -> int:
    """``value`` as a Python int: the one check of an integer argument. TypeError "``name`` must be ``what``, got
    value" unless ``value`` is an int (:func:`is_integer`: numpy's integers too, never a bool; with ``tensor``
    also a 0-d integer tensor, as torch takes one for a ``dim``); ValueError "``name`` must be ``bound`` (default
    ">= low"), got value" if it is below ``low``."""
    if type(value) is not int:  # (a plain int is judged without the numbers ABCs)
        if not is_integer(value, tensor):
            raise TypeError(f"{name} must be {what}, got {value!r}")
        value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be {f'>= {low}' if bound is None else bound}, got {value!r}")
    return value


def check_size(owner: str, name: str, size, optional: bool = False) -> None:
    """TypeError naming ``owner``'s ``name`` unless ``size`` is an int (:func:`is_integer`; or None where
    ``optional``), ValueError if negative: torch's rule for a size (``torch.empty(2.0)`` is a TypeError)."""
    if optional and size is None:
        return
    what = f"a non-negative int{' or None' if optional else ''}"
    check_int(f"{owner}: {name}", size, 0, what=what, bound=what)


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
