"""Input adapters `conv2d` and `conv3d`: a small convolutional stem down to the patch grid.

"Early convolutions help transformers see better" (Xiao et al., 2021): a few strided 3x3(x3)
convolutions with normalisation and activation, then a 1x1 projection to the embedding width,
replace the single patch projection. Same contract as `patch2d`/`patch3d`: x [B, C, *S] -> tokens
[B, N, E] on the patch grid (inputs padded to a multiple of the patch), plus the fixed sin-cos
position embedding of that grid.

The stem halves the resolution with each stride-2 convolution while the patch has a factor of 2
left; what remains (a patch of 3, 5, 6, ...) is one convolution with kernel = stride = that factor.

MAE: with `keep`, the stem runs as a sparse convolution over the visible patches (as SparK,
Tian et al. 2023, pretrains CNNs): the hidden patches are zeroed at the input and again after every
layer, and each GroupNorm takes its statistics over the visible positions only. A visible token
never sees masked content, and its features are normalised as they are when the whole image is
seen, so what pretraining learns carries over to fine-tuning. Only the kept tokens are returned.
GroupNorm, not BatchNorm: no statistics are shared across samples, so batch size and DDP do not
change what a token sees.
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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.check(x)
        grid = grid_shape(tuple(x.shape[2:]), self.patch_size)
        x = pad_to_multiple(x, self.patch_size)
        if keep is None:
            features = self.stem(x)
        else:
            features = self.sparse_stem(x, visible_patches(keep, grid))
        tokens = features.flatten(2).transpose(1, 2)  # [B, N, E]
        tokens = tokens + self.position_embedding(grid, x.device, tokens.dtype)
        if keep is None:
            return tokens
        return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))

    def sparse_stem(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The stem over the visible patches only: x [B, C, *S'] (padded), visible [B, 1, *grid]."""
        x = x * upsample(visible, x)
        for layer in self.stem:
            if isinstance(layer, nn.GroupNorm):
                x = masked_group_norm(layer, x, upsample(visible, x))
            else:
                x = layer(x)
            if isinstance(layer, nn.GELU):
                x = x * upsample(visible, x)
        return x


def visible_patches(keep: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """keep [B, n_keep] (indices into the flattened grid) -> 1 on kept patches, else 0: [B, 1, *grid]."""
    visible = torch.zeros(keep.shape[0], math.prod(grid), device=keep.device)
    visible.scatter_(1, keep, 1.0)
    return visible.reshape(keep.shape[0], 1, *grid)


def upsample(visible: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """visible [B, 1, *grid] repeated to x's spatial size [B, 1, *S] (a multiple of the grid), in x's dtype."""
    for axis in range(2, x.ndim):
        visible = visible.repeat_interleave(x.shape[axis] // visible.shape[axis], dim=axis)
    return visible.to(x.dtype)


def masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`norm` applied to x [B, C, *S] with each group's statistics taken where mask [B, 1, *S] is 1
    (computed in float32, as autocast runs GroupNorm)."""
    b, c = x.shape[:2]
    groups = x.float().reshape(b, norm.num_groups, c // norm.num_groups, -1)  # [B, G, C/G, prod(S)]
    weights = mask.float().reshape(b, 1, 1, -1)
    count = weights.sum(-1, keepdim=True).clamp_min(1.0) * groups.shape[2]
    mean = (groups * weights).sum((2, 3), keepdim=True) / count
    var = ((groups - mean).square() * weights).sum((2, 3), keepdim=True) / count
    normed = ((groups - mean) / torch.sqrt(var + norm.eps)).reshape_as(x)
    scale = (1, c) + (1,) * (x.ndim - 2)
    return (normed * norm.weight.reshape(scale) + norm.bias.reshape(scale)).to(x.dtype)


@hookimpl
def register_adapters(register):
    for dims in (2, 3):
        register(GridAdapter("conv", ConvStem, dims,
                             "Convolutional stem of {kind} down to the patch grid, sin-cos positions (MAE-safe)"))
