"""A reference GPT the fused kernels plug into, and ``patch()`` to put the kernels into existing models."""
import kernels

if getattr(kernels, "__distribution__", None) != "transformer-kernels":
    # Hugging Face's hub kernels share the import name and come first on sys.path: our kernels never load
    raise ImportError(f"transformer needs the `kernels` package of transformer-kernels, but `import kernels` found "
                      f"{getattr(kernels, '__file__', kernels)} (Hugging Face's hub kernels use the same import "
                      "name). Install the two in separate virtualenvs, or `pip uninstall kernels`.")

from transformer.model import GPT, GPTConfig  # noqa: E402
from transformer.patch import patch  # noqa: E402

__all__ = ["GPT", "GPTConfig", "patch"]
