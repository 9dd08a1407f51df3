"""The suite's cases as pytest-benchmark tests (see conftest.py). Timings carry the device and the method."""
import pytest
import torch

from benchmarks.device import detect
from benchmarks.measure import make_step
from benchmarks.providers import Unavailable, make_inputs

DEVICE = detect()


def test_point(benchmark, point):
    case, prov = point
    try:
        fn = prov.resolve()
    except Unavailable as error:
        pytest.skip(f"{prov.name} unavailable: {error}")
    step = make_step(fn, make_inputs(case, DEVICE.torch_device))
    interpreted = DEVICE.interpreted and prov.triton
    benchmark.extra_info.update(device=DEVICE.name, provider=prov.name, case=case.as_record(),
                                threads=torch.get_num_threads() if DEVICE.kind == "cpu" else None,
                                method="interpreter (CPU wall-clock)" if interpreted else
                                ("CPU wall-clock" if DEVICE.kind == "cpu" else "wall-clock + cuda synchronize"))
    if DEVICE.kind == "cuda":
        benchmark(lambda: (step(), torch.cuda.synchronize()))
    else:  # interpreted calls take seconds: a few rounds, not pytest-benchmark's default of many
        benchmark.pedantic(step, rounds=2 if interpreted else 5, warmup_rounds=1)
