"""`restoration`: Models Genesis (Zhou et al., 2021): restore an image from a corrupted copy.

Each sample is corrupted in this order, each step drawn independently per sample, then the dense
head reconstructs every pixel of the original (mean squared error):

1. local pixel shuffling (`local_rate`, 0.5): the image is cut into small blocks (about 1/8 of its
   side, at least 2 pixels); `shuffle_fraction` of them get their pixels permuted.
2. non-linear intensity transformation (`nonlinear_rate`, 0.9): a random monotone cubic Bezier curve
   through (0, 0) and (1, 1), increasing or (half the time) decreasing, maps every intensity.
3. painting (`paint_rate`, 0.9): in-painting (`inpaint_rate`, 0.2) fills 1 to 5 boxes of 1/6 to 1/3
   of each side with uniform noise; otherwise out-painting keeps 1 to 5 boxes of 3/7 to 4/7 of each
   side and fills everything else with noise.

All steps keep the shape and keep values in [0, 1].
"""

import math
from dataclasses import dataclass

import torch

from medformer_core import OutputSpec, PretextTask, TaskContext, TaskResult, View, hookimpl
from medformer_core.api.draws import integers, permutations, uniform
from medformer_core.model.patches import map_tiles

CURVE_POINTS = 256
MAX_BOXES = 5


@dataclass(frozen=True)
class RestorationOptions:
    local_rate: float = 0.5
    shuffle_fraction: float = 0.5
    nonlinear_rate: float = 0.9
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2

    def __post_init__(self):
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """mask [B] -> [B, 1, ...] broadcastable against a [B, C, *S] tensor of `ndim` dims."""
    return mask.reshape(-1, *([1] * (ndim - 1)))


def local_pixel_shuffle(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """x [B, C, *S] -> x with `fraction` of its small blocks shuffled inside (all channels alike)."""
    b, c = x.shape[:2]
    block = tuple(max(2, s // 8) for s in x.shape[2:])
    p = math.prod(block)

    def shuffle(tiles: torch.Tensor) -> torch.Tensor:  # [B, T, C * P]
        t = tiles.shape[1]
        pixels = tiles.reshape(b, t, c, p)
        order = permutations(b * t, p, generator, x.device).reshape(b, t, 1, p).expand(-1, -1, c, -1)
        chosen = uniform((b, t), generator, x.device) < fraction
        return torch.where(chosen[..., None, None], torch.gather(pixels, 3, order), pixels).reshape(tiles.shape)

    return map_tiles(x, block, shuffle)


def bezier_curves(batch: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random monotone intensity curves -> (xs, ys) [B, CURVE_POINTS], xs increasing in [0, 1]."""
    t = torch.linspace(0.0, 1.0, CURVE_POINTS, device=device)
    weights = torch.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])  # [4, T]
    inner = uniform((batch, 2, 2), generator, device)  # two random control points (x, y)
    start, end = torch.zeros(batch, 1, 2, device=device), torch.ones(batch, 1, 2, device=device)
    points = torch.cat([start, inner, end], dim=1)  # [B, 4, 2]
    curve = torch.einsum("kt,bkd->btd", weights, points)  # [B, T, 2]
    xs = curve[..., 0].sort(dim=1).values.contiguous()
    ys = curve[..., 1].sort(dim=1).values
    decreasing = uniform((batch,), generator, device) < 0.5
    return xs, torch.where(decreasing[:, None], ys.flip(1), ys)


def nonlinear_intensity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [B, C, *S] in [0, 1] -> each sample's intensities mapped through its own Bezier curve."""
    b = x.shape[0]
    xs, ys = bezier_curves(b, generator, x.device)
    flat = x.reshape(b, -1).contiguous()
    right = torch.searchsorted(xs, flat).clamp(1, CURVE_POINTS - 1)
    x0, x1 = xs.gather(1, right - 1), xs.gather(1, right)
    y0, y1 = ys.gather(1, right - 1), ys.gather(1, right)
    weight = ((flat - x0) / (x1 - x0).clamp_min(1e-8)).clamp(0, 1)
    return (y0 + weight * (y1 - y0)).reshape(x.shape).clamp(0, 1)


def random_boxes(x: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """A mask [B, 1, *S]: the union of 1 to MAX_BOXES boxes per sample, each side a fraction in
    [low, high] of the image's side, placed uniformly inside."""
    b, dims, device = x.shape[0], x.ndim - 2, x.device
    count = 1 + integers(MAX_BOXES, (b, 1), generator, device)
    active = torch.arange(MAX_BOXES, device=device) < count  # [B, K]
    inside = active.reshape(b, MAX_BOXES, *([1] * dims))
    for axis, size in enumerate(x.shape[2:]):
        side = ((low + (high - low) * uniform((b, MAX_BOXES), generator, device)) * size).long().clamp(1, size)
        start = (uniform((b, MAX_BOXES), generator, device) * (size - side + 1)).long()
        coord = torch.arange(size, device=device)
        along = (coord >= start[..., None]) & (coord < (start + side)[..., None])  # [B, K, size]
        shape = [b, MAX_BOXES] + [1] * dims
        shape[2 + axis] = size
        inside = inside & along.reshape(shape)
    return inside.any(dim=1, keepdim=True)


def paint(x: torch.Tensor, inpaint_rate: float, generator: torch.Generator) -> torch.Tensor:
    """In-paint (noise inside boxes) or out-paint (noise outside boxes), chosen per sample."""
    inner = random_boxes(x, 1 / 6, 1 / 3, generator)
    outer = ~random_boxes(x, 3 / 7, 4 / 7, generator)
    inpaint = per_sample(uniform((x.shape[0],), generator, x.device) < inpaint_rate, x.ndim)
    noise = uniform(tuple(x.shape), generator, x.device)
    return torch.where(torch.where(inpaint, inner, outer), noise, x)


def genesis_corrupt(x: torch.Tensor, options: RestorationOptions, generator: torch.Generator) -> torch.Tensor:
    """x [B, C, *S] in [0, 1] -> the Models Genesis corruption of each sample, same shape and range."""
    steps = [
        (options.local_rate, lambda v: local_pixel_shuffle(v, options.shuffle_fraction, generator)),
        (options.nonlinear_rate, lambda v: nonlinear_intensity(v, generator)),
        (options.paint_rate, lambda v: paint(v, options.inpaint_rate, generator)),
    ]
    for rate, transform in steps:
        chosen = per_sample(uniform((x.shape[0],), generator, x.device) < rate, x.ndim)
        x = torch.where(chosen, transform(x), x)
    return x


class Restoration(PretextTask):
    name = "restoration"
    description = "Models Genesis: restore images/volumes from shuffled, remapped and painted copies"
    spatial_dims = (2, 3)
    Options = RestorationOptions

    def output_spec(self, info, run):
        return OutputSpec("dense", queries="patches")

    def make_view(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        return View(genesis_corrupt(image, self.options, generator), target=image)

    def restore(self, ctx: TaskContext, corrupted: torch.Tensor) -> torch.Tensor:
        """corrupted [B, C, *S] -> the restored image [B, C, *S]."""
        return ctx.unpatchify(ctx.decode(ctx.encode(corrupted)), corrupted)

    def forward(self, ctx, batch, generator):
        view = self.make_view(ctx, batch, generator)
        return self.loss(ctx, self.restore(ctx, view.image), view)

    def loss(self, ctx, prediction, view):
        error = (prediction - view.target).pow(2).mean()
        return TaskResult(error, {"mse": error.item()})

    def pictures(self, ctx, batch, generator):
        view = self.make_view(ctx, batch, generator)
        return {"input": view.target, "corrupted": view.image, "reconstruction": self.restore(ctx, view.image)}


@hookimpl
def register_pretext_tasks(register):
    register(Restoration())
