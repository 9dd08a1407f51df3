"""The context-parallel benchmark's bookkeeping (benchmarks/context_parallel.py), on hand-made rank records."""
import pytest

from benchmarks import context_parallel, roofline
from benchmarks.__main__ import _parser, main as benchmarks_main


def _rank(flops_per_step, kv_bytes=1000, grad_bytes=2000):
    steps = [{"flops": f, "bytes": 0} for f in flops_per_step]
    return {"layout": "zigzag", "length": 256, "world": len(steps), "batch": 1, "heads": 2, "head_dim": 64,
            "dtype": "float16", "peak_bytes": 5, "steps": {"forward": steps, "backward": steps},
            "sent_bytes": {"forward": kv_bytes, "backward": kv_bytes + 2 * grad_bytes},
            "hop_bytes": {"kv": kv_bytes, "grad": grad_bytes}}


def test_model_hides_a_transfer_only_when_every_step_outlasts_it():
    spec = roofline.spec_by_name("H100-SXM5")
    step_ms = 1.0
    flops = step_ms * 1e-3 * spec.flops["float16"]
    ranks = [_rank([flops, flops]), _rank([flops, flops])]
    fast = context_parallel._model(ranks, spec, link_bps=1000 / (0.5e-3))  # a 1000-byte hop takes 0.5 ms
    assert fast["communication_hidden"] and fast["label"] == "model"
    assert fast["compute_ms"] == pytest.approx(4 * step_ms)
    assert fast["ring_ms"] == pytest.approx(4 * step_ms + 1.0)  # + the last dK/dV hop (2000 bytes), never hidden
    slow = context_parallel._model(ranks, spec, link_bps=1000 / (3e-3))  # 3 ms per kv hop
    assert not slow["communication_hidden"]
    # forward: max(1, 3) + 1; backward: max(1, 3) + max(1, 6) (step 1 carries the first dK/dV hop, 6 ms); then
    # the last dK/dV hop, 6 ms
    assert slow["ring_ms"] == pytest.approx((3 + 1) + (3 + 6) + 6)


def test_record_reports_the_imbalance_and_the_slowest_rank_sets_each_step():
    spec = roofline.spec_by_name("A100-SXM4-80GB")
    unit = 1e-3 * spec.flops["float16"]
    ranks = [_rank([unit, 0]), _rank([unit, 2 * unit])]  # contiguous-like: rank 1 does 3 units, rank 0 one
    record = context_parallel._record(ranks)
    assert record["counted_flops_per_rank"] == [2 * unit, 6 * unit]
    assert record["flops_max_over_mean"] == pytest.approx(1.5)
    assert record["sent_bytes_per_rank_per_layer"] == {"forward": 1000, "backward": 5000}
    model = record["model"]["A100 + NVLink 600 GB/s"]
    assert model["compute_ms"] == pytest.approx(2 * (1 + 2))  # per step, the slower rank


def test_scaling_takes_context_parallel():
    assert _parser("scaling").parse_args(["--context-parallel", "4"]).context_parallel == 4
    with pytest.raises(SystemExit):
        _parser("suite").parse_args(["--context-parallel", "4"])


@pytest.mark.parametrize("world,max_len,lengths", [(2, 64, r"\[\]"), (3, 1024, r"\[128, 256, 512, 1024\]")])
def test_points_without_a_length_that_splits_names_the_lengths(world, max_len, lengths):
    """--max-len 64 said that no length up to 64 splits into 4 chunks (64 does: the lengths start at 128); 3 ranks
    need 6 chunks, which no power of two splits into. Raised before any rank is spawned."""
    with pytest.raises(ValueError, match=rf"--context-parallel {world} needs a length that splits into {2 * world} "
                                         rf"chunks; .* --max-len {max_len}\) are {lengths}"):
        context_parallel.points(world, {}, max_len)


@pytest.mark.parametrize("flags,message", [
    (["--context-parallel", "2", "--max-len", "64"], "--context-parallel 2 needs a length that splits into 4"),
    (["--context-parallel", "0"], "--context-parallel must be a positive number of ranks, got 0"),
])
def test_scaling_command_rejects_a_context_parallel_run_with_a_usage_error(capsys, flags, message):
    """Was a ValueError traceback (exit 1); now argparse's usage error (exit 2), as the command's other "nothing to
    measure" errors, before any rank is spawned."""
    with pytest.raises(SystemExit) as exited:
        benchmarks_main(["scaling", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_points_cover_both_layouts_of_every_length_that_splits():
    found = context_parallel.points(2, {"batch": 1}, 256)
    assert [(p["layout"], p["length"]) for p in found] == [(layout, n) for n in (128, 256)
                                                           for layout in context_parallel.LAYOUTS]
    assert all(p["batch"] == 1 for p in found)
