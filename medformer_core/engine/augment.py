"""Batched data augmentation in torch, 2D and 3D alike, with per-sample random parameters.

Geometry (flips, 90-degree rotations, random resized crops) is composed into one affine map per
sample and applied with a single `grid_sample`; intensity jitter, Gaussian noise and Gaussian blur
follow. Every random number comes from the caller's `torch.Generator`, so a batch is reproducible.
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """`Augment(spatial_dims)(x: [B, C, *S] float in [0, 1], generator) -> [B, C, *S] in [0, 1]`.

    flip_prob:    probability of flipping each spatial axis, independently per sample
    rot90:        rotate by k*90 degrees (k uniform in 0..3) in a random square plane of the grid
    crop_scale:   (min, max) fraction of the area/volume kept by a random resized crop (isotropic,
                  resized back to the input size); None or (1, 1) disables it
    intensity:    brightness shift b ~ U(-j, j) and contrast factor c ~ U(1-j, 1+j) per sample
    noise_std:    additive Gaussian noise with a per-sample std ~ U(0, noise_std)
    blur_prob:    probability of a Gaussian blur per sample, sigma ~ U(*blur_sigma) in voxels
    """

    spatial_dims: int
    flip_prob: float = 0.5
    rot90: bool = True
    crop_scale: tuple[float, float] | None = (0.6, 1.0)
    intensity: float = 0.1
    noise_std: float = 0.03
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if not 0.0 <= self.flip_prob <= 1.0 or not 0.0 <= self.blur_prob <= 1.0:
            raise ValueError("flip_prob and blur_prob must be in [0, 1]")
        if self.crop_scale is not None and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.intensity < 0 or self.noise_std < 0 or not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError("intensity, noise_std and blur_sigma must be non-negative (blur_sigma min <= max)")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 2 + self.spatial_dims:
            raise ValueError(f"expected [B, C, *S] with {self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        x = self.geometry(x, generator)
        x = self.intensity_jitter(x, generator)
        x = self.gaussian_noise(x, generator)
        x = self.gaussian_blur(x, generator)
        return x.clamp_(0.0, 1.0)

    # -- geometry -----------------------------------------------------------------------------

    def geometry(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flips, rotations and crops as one affine resampling: x [B, C, *S] -> [B, C, *S]."""
        theta = self.affine(x.shape[0], tuple(x.shape[2:]), generator)  # [B, d, d+1]
        if theta is None:
            return x
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, *S, d]
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def affine(self, batch: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
        """Per-sample maps from output to input coordinates, [B, d, d+1], or None for identity.

        Columns follow `affine_grid`'s axis order (x=W, y=H, z=D), i.e. `size` reversed.
        """
        d = self.spatial_dims
        g = generator
        matrix = torch.eye(d).repeat(batch, 1, 1)  # [B, d, d]
        shift = torch.zeros(batch, d)  # [B, d]
        changed = False
        if self.flip_prob > 0:
            signs = torch.where(_rand(g, batch, d) < self.flip_prob, -1.0, 1.0)  # [B, d]
            matrix = matrix * signs[:, None, :]
            changed = True
        planes = _square_planes(size[::-1])
        if self.rot90 and planes:
            plane = _randint(g, len(planes), batch)
            turns = _randint(g, 4, batch)
            matrix = _rotations(planes, plane, turns, d) @ matrix
            changed = True
        if self.crop_scale is not None and self.crop_scale[0] < 1.0:
            low, high = self.crop_scale
            side = (low + (high - low) * _rand(g, batch)) ** (1.0 / d)  # [B] side fraction per axis
            shift = (2.0 * _rand(g, batch, d) - 1.0) * (1.0 - side)[:, None]  # crop centre inside
            matrix = matrix * side[:, None, None]
            changed = True
        return torch.cat([matrix, shift[:, :, None]], dim=2) if changed else None

    # -- intensity ----------------------------------------------------------------------------

    def intensity_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x * c + b around the sample mean, with c ~ U(1-j, 1+j), b ~ U(-j, j) per sample."""
        if self.intensity <= 0:
            return x
        b = x.shape[0]
        shape = (b,) + (1,) * (x.dim() - 1)
        j = self.intensity
        contrast = (1.0 + j * (2.0 * _rand(generator, b) - 1.0)).view(shape).to(x)
        brightness = (j * (2.0 * _rand(generator, b) - 1.0)).view(shape).to(x)
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        return (x - mean) * contrast + mean + brightness

    def gaussian_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Add N(0, s^2) noise with s ~ U(0, noise_std) per sample."""
        if self.noise_std <= 0:
            return x
        b = x.shape[0]
        std = (self.noise_std * _rand(generator, b)).view((b,) + (1,) * (x.dim() - 1)).to(x)
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
        return x + noise * std

    def gaussian_blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Separable Gaussian blur of the samples chosen with `blur_prob`; the rest pass through."""
        if self.blur_prob <= 0 or self.blur_sigma[1] <= 0:
            return x
        b = x.shape[0]
        chosen = _rand(generator, b) < self.blur_prob  # [B]
        low, high = self.blur_sigma
        sigma = low + (high - low) * _rand(generator, b)  # [B]
        if not bool(chosen.any()):
            return x
        index = chosen.nonzero()[:, 0].to(x.device)
        radius = max(1, math.ceil(3.0 * high))
        x = x.clone()
        x[index] = _blur(x[index], _gaussian_kernels(sigma[chosen], radius).to(x), radius)
        return x


def _blur(x: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """x [n, C, *S] blurred along each spatial axis with kernel [n, 2*radius+1] per sample."""
    n, c = x.shape[:2]
    dims = x.dim() - 2
    kernel = kernel.repeat_interleave(c, dim=0)  # [n*C, K]: one group per (sample, channel)
    y = x.reshape(1, n * c, *x.shape[2:])
    conv = (F.conv2d, F.conv3d)[dims - 2]
    for axis in range(dims):
        view = [1] * dims
        view[axis] = kernel.shape[1]
        pad = [0, 0] * dims  # F.pad lists the last axis first
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        y = conv(F.pad(y, pad, mode="replicate"), kernel.view(n * c, 1, *view), groups=n * c)
    return y.reshape(x.shape)


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) numbers on the CPU drawn from `generator` (on its own device)."""
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _randint(generator: torch.Generator, high: int, n: int) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator, device=generator.device).cpu()


def _square_planes(size: tuple[int, ...]) -> list[tuple[int, int]]:
    """Axis pairs (in affine order) whose extents agree, where a 90-degree turn keeps the shape."""
    return [(i, j) for i, j in itertools.combinations(range(len(size)), 2) if size[i] == size[j]]


def _rotations(planes: list[tuple[int, int]], plane: torch.Tensor, turns: torch.Tensor, d: int) -> torch.Tensor:
    """Rotation matrices [B, d, d] by `turns`*90 degrees in `planes[plane]`, per sample."""
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns]  # exact values, no trigonometry round-off
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns]
    rot = torch.eye(d).repeat(len(turns), 1, 1)
    index = torch.tensor(planes)[plane]  # [B, 2]
    rows = torch.arange(len(turns))
    i, j = index[:, 0], index[:, 1]
    rot[rows, i, i] = cos
    rot[rows, j, j] = cos
    rot[rows, i, j] = -sin
    rot[rows, j, i] = sin
    return rot


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels [B, 2*radius+1]; sigma 0 gives a delta."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    safe = sigma.clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)
