"""A reference GPT the fused kernels plug into, and ``patch()`` to put the kernels into existing models."""
from transformer.model import GPT, GPTConfig
from transformer.patch import patch

__all__ = ["GPT", "GPTConfig", "patch"]
