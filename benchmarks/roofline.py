"""Roofline model of known GPUs: the time counted FLOPs and bytes would take at peak compute or peak bandwidth.

A model, not a measurement: ``time = max(flops / peak_flops, bytes / peak_bandwidth)``. Peak FLOPS are dense
(no 2:4 sparsity). fp16/bf16 use the tensor cores; fp32 uses the plain FP32 units, as the kernels' fp32 ``tl.dot``
does by default (IEEE, like PyTorch's fp32 matmul). With ``torch.backends.cuda.matmul.allow_tf32`` set, the
attention kernels use TF32 tensor cores instead, which this model does not cover: it then overstates fp32
compute time.
"""
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class GPUSpec:
    """Peak dense FLOP/s per dtype and HBM bandwidth (bytes/s) of one GPU model."""

    name: str
    flops: Dict[str, float]
    bandwidth: float
    source: str


# Sources: NVIDIA A100 Tensor Core GPU datasheet (2021, "nvidia-a100-datasheet-us-nvidia-1758950-r4"):
# FP16/BF16 tensor 312 TFLOPS dense (624 sparse), FP32 19.5 TFLOPS, HBM2e 2,039 GB/s (80GB SXM4).
# NVIDIA H100 Tensor Core GPU datasheet (2023): SXM5 FP16/BF16 tensor 1,979 TFLOPS *with sparsity* = 989 dense,
# FP32 67 TFLOPS, HBM3 3.35 TB/s; PCIe 1,513 sparse = 756 dense, FP32 51 TFLOPS, 2.0 TB/s.
# NVIDIA H200 Tensor Core GPU datasheet (2024): SXM FP16/BF16 tensor 1,979 TFLOPS with sparsity = 989 dense,
# FP32 67 TFLOPS, HBM3e 4.8 TB/s.
KNOWN_GPUS = (
    GPUSpec("A100-SXM4-80GB", {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12}, 2.039e12,
            "NVIDIA A100 datasheet"),
    GPUSpec("H100-SXM5", {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12}, 3.35e12,
            "NVIDIA H100 datasheet"),
    GPUSpec("H100-PCIe", {"float16": 756e12, "bfloat16": 756e12, "float32": 51e12}, 2.0e12,
            "NVIDIA H100 datasheet"),
    GPUSpec("H200-SXM", {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12}, 4.8e12, "NVIDIA H200 datasheet"),
)
MODELLED = ("A100-SXM4-80GB", "H100-SXM5")
"""The GPUs every record gets a roofline estimate for."""


def spec_by_name(name: str) -> GPUSpec:
    return next(spec for spec in KNOWN_GPUS if spec.name == name)


def match_device(device_name: str) -> Optional[GPUSpec]:
    """The known spec for a ``torch.cuda.get_device_name()`` string, or None for any other model, however close
    its name: an A100 40GB is not the 80GB, nor is an A100 80GB PCIe (1.94 TB/s) the SXM4, an H100 NVL (3.9 TB/s)
    is neither SXM5 nor PCIe, a GH200's GPU is no H200 SXM (its memory differs)."""
    name = device_name.upper()
    if "NVL" in name or "GH200" in name:
        return None
    if "A100" in name and "80GB" in name and "PCIE" not in name:
        return spec_by_name("A100-SXM4-80GB")
    if "H100" in name:
        return spec_by_name("H100-PCIe" if "PCIE" in name else "H100-SXM5")
    if "H200" in name:
        return spec_by_name("H200-SXM")
    return None


def model_time(spec: GPUSpec, flops: float, nbytes: float, dtype: str) -> dict:
    """Roofline time in ms for ``flops`` and ``nbytes`` on ``spec``, and which roof binds."""
    compute_s = flops / spec.flops[dtype]
    memory_s = nbytes / spec.bandwidth
    return {"time_ms": 1e3 * max(compute_s, memory_s), "bound": "compute" if compute_s >= memory_s else "memory",
            "label": "model"}
