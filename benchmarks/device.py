"""Which device this run measures on, said once and stamped on every record."""
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from kernels import INTERPRETED
from benchmarks.roofline import match_device


@dataclass(frozen=True)
class DeviceInfo:
    """``name`` is the GPU name or "CPU (Triton interpreter)"; ``timing`` is how times were taken."""

    name: str
    kind: str  # "cuda" or "cpu"
    interpreted: bool
    timing: str
    peak: Optional[dict]  # the device's own peak FLOP/s and bandwidth when it is a known GPU

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)

    def as_record(self) -> dict:
        return asdict(self)


def detect() -> DeviceInfo:
    """The current device. Queried lazily (never at import time: there may be no driver)."""
    if not INTERPRETED and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        spec = match_device(name)
        peak = None if spec is None else {"spec": spec.name, "flops": spec.flops, "bandwidth": spec.bandwidth,
                                          "source": spec.source}
        return DeviceInfo(name, "cuda", False, "triton.testing.do_bench (median, 20/80 percentiles)", peak)
    return DeviceInfo("CPU (Triton interpreter)", "cpu", True,
                      "wall-clock; Triton providers run interpreted ('interpreter'), not GPU speed", None)
