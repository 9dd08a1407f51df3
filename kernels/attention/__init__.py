"""Fused attention: Triton kernels (``kernels.py``), their launch configurations (``configs.py``), the public
function and autograd (``api.py``) and torch's SDPA drop-in (``sdpa.py``)."""
from kernels.attention.api import attention  # noqa: F401
from kernels.attention.sdpa import scaled_dot_product_attention  # noqa: F401
