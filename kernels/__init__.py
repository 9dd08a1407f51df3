"""Fused Triton kernels for transformers: attention (with its variants, packed batches and decoding), softmax and
layer/RMS norm, with autograd.

On a machine without a GPU, importing this package turns on Triton's interpreter (see ``kernels/_runtime.py``),
so the same kernels run, slowly but exactly, on CPU tensors.
"""
__distribution__ = "transformer-kernels"  # kernels._runtime.DISTRIBUTION: its import checks this is the package
from kernels._runtime import INTERPRETED  # noqa: F401  (first: chooses the interpreter before triton loads)
from kernels import reference  # noqa: F401
from kernels.softmax import softmax, log_softmax  # noqa: F401
from kernels.attention import attention, scaled_dot_product_attention  # noqa: F401
from kernels.attention.api import attention_dropout_mask  # noqa: F401
from kernels.attention.block_mask import BlockMask, MaskMod, ScoreMod, create_block_mask  # noqa: F401
from kernels.attention.mods import alibi_score, document_mask, prefix_lm_mask, softcap_score  # noqa: F401
from kernels.attention.varlen import attention_varlen  # noqa: F401
from kernels.attention.decode import attention_with_kvcache  # noqa: F401
from kernels.layernorm import layer_norm, rms_norm, add_layer_norm, add_rms_norm, LayerNorm, RMSNorm  # noqa: F401


def _keep_attention_modules_reachable() -> None:
    """``kernels.attention`` is the function (the import above rebinds the name its subpackage had), so the
    subpackage's modules become attributes of the function too: ``import kernels.attention.varlen as varlen`` and
    ``kernels.attention.mods.document_mask`` resolve through it as they would through the package."""
    import sys

    prefix = "kernels.attention."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            setattr(attention, name[len(prefix):], module)


_keep_attention_modules_reachable()
