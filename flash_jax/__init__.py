"""flash_jax: exact FlashAttention for JAX, as Pallas GPU kernels.

The public function `dot_product_attention` is a drop-in for
`jax.nn.dot_product_attention` (same argument names, BTNH layout).

Also exported: `BlockSizes` (tiling overrides), `AttentionConfig`,
`MaskSpec` and `MaskArrays` (the static and dynamic halves of a call, for
backends and tests), `dropout_keep_mask` (the exact dropout mask of a call),
`reference` (plain attention, the tests' oracle), and the residual names
`OUTPUT_NAME` / `LSE_NAME` / `RESIDUAL_NAMES`: under
``jax.checkpoint(..., policy=jax.checkpoint_policies.save_only_these_names(
*flash_jax.RESIDUAL_NAMES))`` a checkpointed backward reuses the forward's
output and lse instead of rerunning the forward kernel.
"""

from flash_jax import dropout, reference
from flash_jax.api import dot_product_attention
from flash_jax.config import AttentionConfig, BlockSizes
from flash_jax.dropout import keep_mask as dropout_keep_mask
from flash_jax.masks import MaskArrays, MaskSpec
from flash_jax.vjp import LSE_NAME, OUTPUT_NAME, RESIDUAL_NAMES

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "BlockSizes",
    "LSE_NAME",
    "MaskArrays",
    "MaskSpec",
    "OUTPUT_NAME",
    "RESIDUAL_NAMES",
    "dot_product_attention",
    "dropout",
    "dropout_keep_mask",
    "reference",
]
