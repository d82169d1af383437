"""medformer kernels: Triton fused attention and patch embedding beside torch references."""
