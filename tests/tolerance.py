"""The tolerance rule used throughout the tests (FlashAttention's): compare against a float64 reference, and let the
kernel be at most 2x (forward) / 3x (backward) as far from it as PyTorch is when it does the same computation in
the same precision, plus a tiny slack.
"""
import torch

FORWARD, BACKWARD = 2.0, 3.0
SLACK = 1e-5  # relative to max(1, |reference|): absorbs the float32 rounding of an exactly-matching computation


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| in float64; NaN anywhere (or in a different place) counts as infinite."""
    a, r = actual.detach().double(), reference.detach().double()
    if a.shape != r.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(r.shape)}")
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(r)
    diff = (a - r).abs().masked_fill(both_nan, 0.0)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.max().item()


def assert_close(actual, reference, torch_same_precision, factor: float = FORWARD, name: str = "output"):
    """Assert max|actual - reference| <= factor * max|torch_same_precision - reference| + slack.

    ``reference`` is computed in float64 from the same (low-precision) inputs; ``torch_same_precision`` is the
    same computation done by PyTorch in the kernel's dtype, which measures the rounding noise of that dtype.
    """
    err = max_error(actual, reference)
    noise = max_error(torch_same_precision, reference)
    scale = max(1.0, reference.detach().double().abs().nan_to_num(0.0).max().item() if reference.numel() else 1.0)
    bound = factor * noise + SLACK * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {factor:g} x torch's {noise:.3g} + slack ({bound:.3g})"
