"""Torch references for the Triton kernels: the CPU backend, the tests' ground truth, the bench baselines."""

import torch
import torch.nn.functional as F

from medformer_core.model.patches import patchify


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> [B, H, Nq, d], with torch's scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, materialising the [B, H, Nq, Nk] score matrix."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # [B, H, Nq, Nk]
    return torch.softmax(scores, dim=-1) @ v


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
