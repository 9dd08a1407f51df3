"""The tolerance rule used throughout the tests (FlashAttention's): compare against a float64 reference, and let the
kernel be at most 2x (forward) / 3x (backward) as far from it as PyTorch is when it does the same computation in
the same precision, plus a slack of a couple of roundings of the output's dtype.
"""
import torch

FORWARD, BACKWARD = 2.0, 3.0
SLACK_ULPS = 2.0
"""The slack, in units of ``torch.finfo(actual.dtype).eps * max|reference|``: two roundings of the output dtype at the
reference's magnitude (FlashAttention's tests allow twice the output dtype's rounding error). It covers a value
PyTorch happens to get exactly right while the kernel rounds it once, and is tiny next to the 2x/3x term
for float32 (about 2.4e-7 of the magnitude)."""


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| in float64. Equal values (the same infinity, or NaN in both) count as 0; NaN or an
    infinity in one of them only counts as infinite."""
    a, r = actual.detach().double(), reference.detach().double()
    if a.shape != r.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(r.shape)}")
    if a.numel() == 0:
        return 0.0
    same = (a == r) | (torch.isnan(a) & torch.isnan(r))
    diff = (a - r).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return diff.max().item()


def slack(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``SLACK_ULPS * eps(actual.dtype) * max|reference|`` over the reference's finite values."""
    finite = reference.detach().double()
    finite = finite[finite.isfinite()]
    magnitude = finite.abs().max().item() if finite.numel() else 0.0
    return SLACK_ULPS * torch.finfo(actual.dtype).eps * magnitude


def assert_close(actual, reference, torch_same_precision, factor: float = FORWARD, name: str = "output"):
    """Assert max|actual - reference| <= factor * max|torch_same_precision - reference| + slack(actual, reference).

    ``reference`` is computed in float64 from the same (low-precision) inputs; ``torch_same_precision`` is the
    same computation done by PyTorch in the kernel's dtype, which measures the rounding noise of that dtype. A
    baseline with NaN or an infinity where the reference has none fails: it would make the bound infinite.
    """
    err = max_error(actual, reference)
    noise = max_error(torch_same_precision, reference)
    if noise == float("inf"):
        raise AssertionError(f"{name}: torch's same-precision baseline has NaN/inf where the float64 reference "
                             "does not, so it bounds nothing")
    bound = factor * noise + slack(actual, reference)
    assert err <= bound, f"{name}: max error {err:.3g} > {factor:g} x torch's {noise:.3g} + slack ({bound:.3g})"
