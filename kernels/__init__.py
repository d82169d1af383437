"""medformer kernels: Triton fused attention and patch embedding beside torch references.

    from medformer_kernels import attention, patch_embed

Importing this package never imports Triton (an optional extra); the Triton kernels load on first use.
"""

from medformer_kernels.dispatch import attention, patch_embed

__all__ = ["attention", "patch_embed"]
