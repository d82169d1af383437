"""Patch geometry for 2D and 3D inputs: padding, grids, (un)patchify, sin-cos position embeddings.

Patches are numbered row-major over the grid (the order of flattening a Conv output), and a patch's
pixels are flattened in the Conv weight's layout (C, *patch). Inputs whose size the patch does not
divide are zero-padded at the end of each spatial axis (bottom, right, back); `unpatchify` crops the
padding off again.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def grid_shape(size: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The patch grid of a `size` input after padding: ceil(size / patch) per axis."""
    return tuple(math.ceil(s / p) for s, p in zip(size, patch))


def pad_to_multiple(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """x: [B, C, *S] -> [B, C, *S'] with S' the next multiple of `patch`, zeros at the end."""
    size = x.shape[2:]
    extra = [(-s) % p for s, p in zip(size, patch)]
    if not any(extra):
        return x
    pads = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pads += [0, e]
    return F.pad(x, pads)


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """x: [B, C, *S] -> patches [B, N, C * prod(patch)] (padded first)."""
    x = pad_to_multiple(x, patch)
    b, c, dims = x.shape[0], x.shape[1], len(patch)
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    split = [b, c] + [n for g, p in zip(grid, patch) for n in (g, p)]  # [B, C, g0, p0, g1, p1, ...]
    order = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
    return x.reshape(split).permute(order).reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(patches: torch.Tensor, patch: tuple[int, ...], channels: int, size: tuple[int, ...]) -> torch.Tensor:
    """patches: [B, N, C * prod(patch)] -> x: [B, C, *size] (the padding is cropped off)."""
    b, dims = patches.shape[0], len(patch)
    grid = grid_shape(size, patch)
    x = patches.reshape([b, *grid, channels, *patch])
    order = [0, 1 + dims] + [n for i in range(dims) for n in (1 + i, 2 + dims + i)]  # [B, C, g0, p0, ...]
    x = x.permute(order).reshape([b, channels] + [g * p for g, p in zip(grid, patch)])
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def map_tiles(x: torch.Tensor, tile: tuple[int, ...], change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [B, C, *S] cut into whole `tile`s (a remainder at the end of an axis stays as it is);
    `change` maps those tiles, [B, T, C * prod(tile)] row-major like `patchify`, to new ones."""
    covered = tuple(s // t * t for s, t in zip(x.shape[2:], tile))
    region = (slice(None), slice(None)) + tuple(slice(0, c) for c in covered)
    out = x.clone()
    out[region] = unpatchify(change(patchify(x[region], tile)), tile, x.shape[1], covered)
    return out


def sincos_position_embedding(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of a 2D or 3D grid: [prod(grid), dim], row-major like `patchify`.

    Each axis gets an equal, even share of the channels (half sin, half cos over geometric
    frequencies, as in MAE); channels left over when `dim` does not split evenly stay zero.
    """
    share = 2 * (dim // (2 * len(grid)))
    if share == 0:
        raise ValueError(f"embedding width {dim} is too small for a {len(grid)}D position embedding")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(share // 2, dtype=torch.float64) / (share // 2))
    parts = []
    for axis in coords:
        angles = axis.reshape(-1, 1) * freqs  # [N, share / 2]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1])).float()
