"""Torch references for the Triton kernels: the CPU backend, the tests' ground truth, the bench baselines."""

import math

import torch
import torch.nn.functional as F


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> [B, H, Nq, d], with torch's scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, materialising the [B, H, Nq, Nk] score matrix."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, Nq, Nk]
    return torch.softmax(scores, dim=-1) @ v


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """x: [B, C, *S] -> [B, N, C*prod(patch)]: patches row-major over the grid, each flattened as (c, *offsets).

    The same patch order as flattening a Conv output, the same vector order as a Conv weight [E, C, *patch].
    """
    b, c, *spatial = x.shape
    grid = [s // p for s, p in zip(spatial, patch)]
    split = [v for g, p in zip(grid, patch) for v in (g, p)]
    x = x.reshape(b, c, *split)  # [B, C, G0, P0, G1, P1, ...]
    n = len(patch)
    order = [0, *(2 + 2 * i for i in range(n)), 1, *(3 + 2 * i for i in range(n))]  # [B, G0, G1, .., C, P0, P1, ..]
    return x.permute(order).reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(patches: torch.Tensor, shape: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `patchify`: patches [B, N, C*prod(patch)] -> x [B, C, *S] with x.shape == shape."""
    b, c, *spatial = shape
    grid = [s // p for s, p in zip(spatial, patch)]
    n = len(patch)
    x = patches.reshape(b, *grid, c, *patch)  # [B, G0, G1, .., C, P0, P1, ..]
    order = [0, n + 1, *(v for i in range(n) for v in (1 + i, n + 2 + i))]  # [B, C, G0, P0, G1, P1, ..]
    return x.permute(order).reshape(shape)


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """tokens: [B, N, F], keep: [B, n_keep] indices -> [B, n_keep, F]."""
    return torch.take_along_dim(tokens, keep.long()[..., None], dim=1)


def patch_embed_reference(x, weight, bias, pos, patch, keep=None) -> torch.Tensor:
    """reshape + (gather) + linear + add. x: [B, C, *S] -> tokens [B, N or n_keep, E]; `patch` a tuple."""
    patches = patchify(x, patch)  # [B, N, K]
    if keep is not None:
        patches = gather_tokens(patches, keep)  # [B, n_keep, K]
    out = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)  # [B, T, E]
    if pos is not None:
        out = out + (pos if keep is None else pos[keep.long()])
    return out


def patch_embed_conv(x, weight, bias, pos, patch, keep=None) -> torch.Tensor:
    """The bench baseline: Conv2d/Conv3d with kernel = stride, flatten, add pos, then gather at keep."""
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    out = conv(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)  # [B, N, E]
    if pos is not None:
        out = out + pos
    return out if keep is None else gather_tokens(out, keep)


def patch_embed_all_then_gather(x, weight, bias, pos, patch, keep) -> torch.Tensor:
    """The bench baseline for keep: embed every patch with the reference, then gather the kept tokens."""
    return gather_tokens(patch_embed_reference(x, weight, bias, pos, patch), keep)
