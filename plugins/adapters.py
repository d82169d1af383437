"""Input adapters `patch2d` and `patch3d`: patch embedding plus a fixed sin-cos position embedding.

One dimension-generic module serves both. The patch projection runs through the kernels' dispatch
(`medformer_kernels.patch_embed`: Triton on CUDA, reshape + linear on CPU, never a Conv3d). Inputs
whose size the patch does not divide are zero-padded at the end of each axis to the next multiple
(a 28^2 image with 8^2 patches is embedded as 32^2, a 4x4 grid). The position embedding follows the
input's own grid, so one adapter embeds 28^3 and 64^3 volumes alike. `GridEmbedding` and
`GridAdapter` are shared with the convolutional stems (`medformer_plugins.conv_adapters`).
"""

import math

import torch
from torch import nn

import medformer_kernels as kernels
from medformer_core import InputAdapter, UsageError, hookimpl
from medformer_core.model.patches import grid_shape, pad_to_multiple, sincos_position_embedding

AXES = {2: "H, W", 3: "D, H, W"}


class GridEmbedding(nn.Module):
    """Base of the adapters that embed x [B, C, *S] onto a patch grid: shape checks and the fixed
    sin-cos position embedding of the grid. Subclasses implement `forward(x, keep=None)`."""

    def __init__(self, name: str, spatial_dims: int, channels: int, embed_dim: int, patch: int):
        super().__init__()
        self.name = name
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.embed_dim = embed_dim
        self.patch_size = (patch,) * spatial_dims
        self._positions: dict[tuple, torch.Tensor] = {}

    def expected_shape(self) -> str:
        patch = self.patch_size[0]
        return f"[B, {self.channels}, {AXES[self.spatial_dims]}] with every spatial size >= {patch}"

    def check(self, x: torch.Tensor) -> None:
        """Raise a UsageError naming the expected shape when `x` does not fit this adapter."""
        fits = (
            x.ndim == 2 + self.spatial_dims
            and x.shape[1] == self.channels
            and all(s >= p for s, p in zip(x.shape[2:], self.patch_size))
        )
        if not fits:
            raise UsageError(
                f"input adapter '{self.name}' expects {self.expected_shape()}, got {list(x.shape)}",
                hint="check the dataset's dimensionality, channels and size",
            )

    def position_embedding(self, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed sin-cos embedding of `grid`, centred: [prod(grid), E] (cached per grid and device).

        Centred over the grid, the positions add nothing to the mean of an image's tokens: the
        sin-cos columns of low frequency are near 1 at every patch, and would otherwise give every
        image the same large average.
        """
        key = (grid, device, dtype)
        if key not in self._positions:
            positions = sincos_position_embedding(grid, self.embed_dim)
            self._positions[key] = (positions - positions.mean(dim=0)).to(device, dtype)
        return self._positions[key]


class PatchEmbedding(GridEmbedding):
    """x: [B, C, *S] (S = (H, W) or (D, H, W)) -> tokens [B, N, E], or [B, n_keep, E] with `keep`.

    weight [E, C, *patch] (Conv layout) and bias [E] are learned; the position embedding is fixed.
    """

    def __init__(self, name: str, spatial_dims: int, channels: int, embed_dim: int, patch: int):
        super().__init__(name, spatial_dims, channels, embed_dim, patch)
        self.weight = nn.Parameter(torch.empty(embed_dim, channels, *self.patch_size))
        self.bias = nn.Parameter(torch.zeros(embed_dim))
        fan_in, fan_out = channels * math.prod(self.patch_size), embed_dim
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform on the flattened projection, as MAE
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.check(x)
        grid = grid_shape(tuple(x.shape[2:]), self.patch_size)
        x = pad_to_multiple(x, self.patch_size)
        pos = self.position_embedding(grid, x.device, x.dtype)
        return kernels.patch_embed(x, self.weight, self.bias, pos, self.patch_size[0], keep)


class GridAdapter(InputAdapter):
    """Registers one dimensionality of a `GridEmbedding` module class as `{prefix}{dims}d`."""

    def __init__(self, prefix: str, module: type[GridEmbedding], spatial_dims: int, what: str):
        self.name = f"{prefix}{spatial_dims}d"
        self.module = module
        self.spatial_dims = (spatial_dims,)
        self.dims = spatial_dims
        kind = "images [B, C, H, W]" if spatial_dims == 2 else "volumes [B, C, D, H, W]"
        self.description = what.format(kind=kind)

    def build(self, *, channels: int, size: tuple[int, ...], embed_dim: int, patch: int) -> GridEmbedding:
        if len(size) != self.dims or min(size) < patch:
            raise UsageError(f"input adapter '{self.name}' cannot embed size {list(size)} with {patch}-wide patches",
                             hint=f"it needs {self.dims} spatial sizes, each >= the patch")
        return self.module(self.name, self.dims, channels, embed_dim, patch)


@hookimpl
def register_adapters(register):
    for dims in (2, 3):
        register(GridAdapter("patch", PatchEmbedding, dims,
                             "Patch embedding of {kind} with sin-cos positions (pads to a multiple of the patch)"))
