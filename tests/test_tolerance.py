"""The tolerance rule itself (tests/tolerance.py): it fails where it should, and no NaN or infinity loosens it."""
import pytest
import torch

from tolerance import BACKWARD, assert_close, max_error, slack

INF, NAN = float("inf"), float("nan")


def test_bound_is_the_factor_times_torchs_error():
    ref = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    baseline = ref + 1e-4  # float64 throughout, so the slack is negligible here
    assert_close(ref + 1.99e-4, ref, baseline)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref + 2.01e-4, ref, baseline)
    assert_close(ref - 2.99e-4, ref, baseline, BACKWARD)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref - 3.01e-4, ref, baseline, BACKWARD)


def test_slack_follows_the_output_dtype():
    ref = torch.full((4,), 100.0, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert slack(ref.to(dtype), ref) == 2 * torch.finfo(dtype).eps * 100.0
    # float32: about 2.4e-5 at magnitude 100, where a flat 1e-5 * max(1, |ref|) allowed 1e-3
    exact = ref.float()
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref + 1e-4, ref, exact)


def test_nan_or_inf_in_torchs_baseline_fails_instead_of_making_the_bound_infinite():
    ref = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    for bad in (NAN, INF, -INF):
        baseline = torch.tensor([0.5, bad, 0.25])
        with pytest.raises(AssertionError, match="baseline has NaN/inf"):
            assert_close(ref.float(), ref, baseline)


def test_matching_non_finite_values_are_exact_and_do_not_scale_the_slack():
    ref = torch.tensor([-INF, NAN, 2.0], dtype=torch.float64)
    baseline = torch.tensor([-INF, NAN, 2.0])
    assert max_error(baseline, ref) == 0.0
    assert slack(baseline, ref) == 2 * torch.finfo(torch.float32).eps * 2.0  # the infinity is not a magnitude
    assert_close(baseline, ref, baseline)
    for wrong in ([INF, NAN, 2.0], [-INF, 0.0, 2.0], [-INF, NAN, NAN], [0.0, NAN, 2.0]):
        assert max_error(torch.tensor(wrong), ref) == INF
        with pytest.raises(AssertionError, match="max error inf"):
            assert_close(torch.tensor(wrong), ref, baseline)
