"""Fused attention, in the order a call crosses it: the public function (``api.py``), its argument checks
(``checks.py``), the options and cached launch plans (``plan.py``), the autograd (``ops.py``), the tile tables per
GPU family and the launch (``configs.py``), the Triton kernels (``kernels.py``); the other entry points are packed
sequences (``varlen.py``), decoding against a KV cache (``decode.py``) and torch's SDPA drop-in (``sdpa.py``)."""
from kernels.attention.api import attention  # noqa: F401
from kernels.attention.sdpa import scaled_dot_product_attention  # noqa: F401
