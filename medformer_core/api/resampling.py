"""Resampling shared by the data that trains a model and the scans it predicts, so both agree."""

import torch
import torch.nn.functional as F


def grid_for_spacing(shape: tuple[int, ...], spacing: tuple[float, ...],
                     target: tuple[float, ...] | None) -> tuple[int, ...]:
    """The voxel grid [*S'] that covers a scan of `shape` voxels of `spacing` mm with voxels of
    `target` mm (None: the scan's own grid)."""
    if target is None:
        return tuple(shape)
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def resample(x: torch.Tensor, shape: tuple[int, ...], nearest: bool = False) -> torch.Tensor:
    """x [C, *S] -> [C, *shape] float: area averaging when every axis shrinks, else linear;
    `nearest` keeps class values (masks). Unchanged when the shapes agree."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    x = x[None].float()  # [1, C, *S]
    if nearest:
        return F.interpolate(x, size=shape, mode="nearest-exact")[0]
    if all(t <= n for t, n in zip(shape, x.shape[2:])):
        return F.interpolate(x, size=shape, mode="area")[0]
    linear = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(x, size=shape, mode=linear, align_corners=False)[0]
