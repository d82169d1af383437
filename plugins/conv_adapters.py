"""Input adapters `conv2d` and `conv3d`: a small convolutional stem down to the patch grid.

"Early convolutions help transformers see better" (Xiao et al., 2021): a few strided 3x3(x3)
convolutions with normalisation and activation, then a 1x1 projection to the embedding width,
replace the single patch projection. Same contract as `patch2d`/`patch3d`: x [B, C, *S] -> tokens
[B, N, E] on the patch grid (inputs padded to a multiple of the patch), plus the fixed sin-cos
position embedding of that grid.

The stem halves the resolution with each stride-2 convolution while the patch has a factor of 2
left; what remains (a patch of 3, 5, 6, ...) is one convolution with kernel = stride = that factor.

MAE: with `keep`, the pixels of every patch not kept are zeroed before the stem, so a visible
token never sees masked content (its receptive field reaches into neighbouring patches, which are
then zeros), and only the kept tokens are returned. GroupNorm, not BatchNorm: no statistics are
shared across samples, so batch size, masking and DDP do not change what a token sees.
"""

import math

import torch
from torch import nn

from medformer_core import hookimpl
from medformer_core.model.patches import grid_shape, pad_to_multiple
from medformer_plugins.adapters import GridAdapter, GridEmbedding

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def stem_strides(patch: int) -> list[int]:
    """The strides of the stem's convolutions, whose product is `patch`: 2s first, then the rest."""
    strides = []
    while patch % 2 == 0:
        strides.append(2)
        patch //= 2
    return strides + ([patch] if patch > 1 else [])


def group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if width % 8 == 0 else 1, width)


class ConvStem(GridEmbedding):
    """x: [B, C, *S] -> tokens [B, N, E] (or [B, n_keep, E] with `keep` [B, n_keep])."""

    def __init__(self, name: str, spatial_dims: int, channels: int, embed_dim: int, patch: int):
        super().__init__(name, spatial_dims, channels, embed_dim, patch)
        conv = CONV[spatial_dims]
        strides = stem_strides(patch)
        layers, width_in = [], channels
        for i, stride in enumerate(strides):
            width = max(8, embed_dim // 2 ** (len(strides) - i))  # E/4, E/2 for a patch of 4
            kernel, padding = (3, 1) if stride == 2 else (stride, 0)
            layers += [conv(width_in, width, kernel, stride, padding, bias=False), group_norm(width), nn.GELU()]
            width_in = width
        layers.append(conv(width_in, embed_dim, 1))
        self.stem = nn.Sequential(*layers)

    def mask_hidden_patches(self, x: torch.Tensor, grid: tuple[int, ...], keep: torch.Tensor) -> torch.Tensor:
        """x [B, C, *S'] (padded) with the pixels of every patch not in `keep` [B, n_keep] set to 0."""
        visible = x.new_zeros(x.shape[0], math.prod(grid))
        visible.scatter_(1, keep, 1.0)
        visible = visible.reshape(x.shape[0], 1, *grid)
        for axis, p in enumerate(self.patch_size):
            visible = visible.repeat_interleave(p, dim=2 + axis)
        return x * visible

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.check(x)
        grid = grid_shape(tuple(x.shape[2:]), self.patch_size)
        x = pad_to_multiple(x, self.patch_size)
        if keep is not None:
            x = self.mask_hidden_patches(x, grid, keep)
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, E]
        tokens = tokens + self.position_embedding(grid, x.device, tokens.dtype)
        if keep is None:
            return tokens
        return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))


@hookimpl
def register_adapters(register):
    for dims in (2, 3):
        register(GridAdapter("conv", ConvStem, dims,
                             "Convolutional stem of {kind} down to the patch grid, sin-cos positions (MAE-safe)"))
