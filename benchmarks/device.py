"""Which device this run measures on, said once and stamped on every record."""
import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

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


@contextlib.contextmanager
def cpu_threads(device: DeviceInfo, threads: int) -> Iterator[None]:
    """On CPU, torch's ``threads`` threads inside the block (on a shared machine a small op waiting for a busy
    second thread takes milliseconds instead of microseconds), and the caller's count again after it: a command's
    main may run inside a longer process (the tests). A GPU run is left as it is."""
    previous = torch.get_num_threads()
    if device.kind == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
