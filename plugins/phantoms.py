"""Synthetic phantoms: procedurally generated 2D images and 3D volumes, the embedded default dataset.

Each sample is a simple abdomen with a canonical orientation; the class is a shape drawn inside it:
0 ball/disk, 1 box/square, 2 shell/ring, 3 rod (an elongated ellipsoid along a random axis).

The anatomy is laid out in coordinates (d, y, x) in [-1, 1]: d runs head to feet over the slices
(D), y front to back (H, the back at the bottom) and x across (W). An elliptic soft-tissue body with
a flat back, tapering towards the feet, holds a large liver on the image's left and a small spleen
on its right (upper slices), two kidneys (lower slices), a bright spine column near the back and a
dark gas pocket at the front (upper slices). A 2D phantom is the middle slice (d = 0). Samples
differ only by small jitter (the body's scale and place, the organs' places and sizes, contrasts,
a smooth shading, noise), so up is always up. The shape sits at a jittered place in the middle of
the body, centred on a voxel and at least a voxel around it from size 8 on, so that small sizes keep
it, and brighter than all tissue but bone. Outside the body the image is 0 (air); inside it never is.

Channels see the same anatomy with different contrasts, as MR sequences do: odd channels invert the
contrast of the tissues (air stays dark). Each sample's segmentation mask is the shape it draws:
voxel class 1 ("shape") inside, 0 ("background") outside, whatever the shape's kind, so the masks
are ground truth exactly aligned with the images.

Settings go in the dataset argument: `--dataset phantoms3d:size=32,channels=2,count=256,classes=3`.
"""

from dataclasses import dataclass, replace

import numpy as np

from medformer_core import (
    DatasetFactory,
    DatasetInfo,
    DatasetOptions,
    ImageSplit,
    UsageError,
    hookimpl,
    parse_options,
    split_pairs,
)

SHAPES = ("ball", "box", "shell", "rod")
MASK_LABELS = {0: "background", 1: "shape"}
SPLIT_FRACTIONS = {"train": 1.0, "val": 0.25, "test": 0.25}
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}

# Organs, painted over the body in this order: intensity, centre (d, y, x), semi-axes (d, y, x).
ORGANS = (
    (0.66, (-0.35, -0.06, -0.34), (0.85, 0.38, 0.40)),  # liver
    (0.54, (-0.45, 0.10, 0.46), (0.55, 0.16, 0.13)),  # spleen
    (0.20, (0.45, 0.26, -0.38), (0.60, 0.15, 0.12)),  # kidneys
    (0.20, (0.45, 0.26, 0.38), (0.60, 0.15, 0.12)),
    (0.95, (0.00, 0.33, 0.00), (np.inf, 0.12, 0.12)),  # spine, through every slice
    (0.03, (-0.25, -0.36, 0.36), (0.45, 0.12, 0.20)),  # gas
)
# Intensity per tissue index: 0 outside, 1 soft tissue, 2... the organs, last the shape.
LEVELS = np.array([0.0, 0.38] + [level for level, _, _ in ORGANS] + [0.88], dtype=np.float32)
DARK = LEVELS < 0.1  # outside and gas: air, dark in every channel
CENTRES = np.array([centre for _, centre, _ in ORGANS], dtype=np.float32)
SEMI_AXES = np.array([semi for _, _, semi in ORGANS], dtype=np.float32)
SHAPE_REGION = np.array([(-0.25, 0.25), (-0.22, -0.08), (-0.12, 0.12)])  # (low, high) of its centre per axis


def generate_phantoms(
    count: int, size: int, spatial_dims: int, channels: int = 1, classes: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate `count` phantoms deterministically from `seed`.

    Returns images [count, channels, *S] uint8, labels [count, 1] int64 and masks [count, *S] uint8
    (1 inside the shape), with S = [size] * spatial_dims.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=count)
    axes = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    grid = np.stack(np.meshgrid(*([axes] * spatial_dims), indexing="ij"))  # [dims, *S]
    images = np.empty((count, channels) + (size,) * spatial_dims, dtype=np.uint8)
    masks = np.empty((count,) + (size,) * spatial_dims, dtype=np.uint8)
    for i in range(count):
        images[i], masks[i] = _one_phantom(grid, int(labels[i]), channels, rng)
    return images, labels[:, None].astype(np.int64), masks


def _one_phantom(grid: np.ndarray, label: int, channels: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sample: grid [dims, *S] -> image [channels, *S] uint8 and its mask [*S] uint8."""
    tissue, mask = _layout(grid, label, rng)
    levels = LEVELS + rng.normal(0.0, 0.03, size=(channels, len(LEVELS))).astype(np.float32)
    levels[1::2] = 1.0 - levels[1::2]  # odd channels invert the contrast, as T1 vs T2 do...
    levels[:, DARK] = LEVELS[DARK]  # ...but air stays dark
    dims = grid.shape[0]
    shading = (grid * rng.uniform(-0.08, 0.08, size=(dims,) + (1,) * dims).astype(np.float32)).sum(0)
    noise = rng.normal(0.0, 0.04, size=(channels,) + mask.shape).astype(np.float32)
    image = np.clip(levels[:, tissue] + shading + noise, 0.01, 1.0) * (tissue > 0)
    return (image * 255).astype(np.uint8), mask


def _layout(grid: np.ndarray, label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue index [*S] (see LEVELS) and the shape's mask [*S] uint8 of one jittered sample."""
    dims, size = grid.shape[0], grid.shape[1]
    column = (3,) + (1,) * dims
    scale, shift = rng.uniform(0.93, 1.05, size=3), rng.uniform(-0.04, 0.04, size=3)
    points = np.concatenate([np.zeros_like(grid[:1]), grid]) if dims == 2 else grid  # 2D: the slice d = 0
    u = (points - shift.reshape(column)) / scale.reshape(column)  # anatomical coordinates (d, y, x)
    d, y, x = u
    taper = 1.0 - 0.15 * d  # the body narrows towards the feet
    body = ((y / (0.68 * taper)) ** 2 + (x / (0.8 * taper)) ** 2 < 1.0) & (y < 0.45)  # the back is flat
    tissue = body.astype(np.int64)
    centres = CENTRES + rng.uniform(-0.04, 0.04, size=CENTRES.shape)
    semi_axes = SEMI_AXES * rng.uniform(0.9, 1.1, size=SEMI_AXES.shape)
    for k in range(len(ORGANS)):
        organ = (((u - centres[k].reshape(column)) / semi_axes[k].reshape(column)) ** 2).sum(0) < 1.0
        tissue[organ & body] = k + 2

    step = 2.0 / (size - 1)  # the voxel spacing
    centre = shift + scale * rng.uniform(SHAPE_REGION[:, 0], SHAPE_REGION[:, 1])  # in the image's coordinates
    centre = np.round((centre[3 - dims:] + 1.0) / step) * step - 1.0  # on a voxel
    radius = max(rng.uniform(0.19, 0.28), min(1.3 * step, 0.38))  # down to size 8, a voxel around the centre
    offset = grid - centre.astype(np.float32).reshape((dims,) + (1,) * dims)  # [dims, *S]
    if SHAPES[label] == "ball":
        mask = np.sqrt((offset**2).sum(0)) < radius
    elif SHAPES[label] == "box":
        mask = np.abs(offset).max(0) < radius * 0.85
    elif SHAPES[label] == "shell":  # at least a voxel thick
        r = np.sqrt((offset**2).sum(0))
        mask = (r < radius) & (r > radius - max(0.4 * radius, step))
    else:
        rod = np.full(dims, radius * 0.45, dtype=np.float32)
        rod[rng.integers(dims)] = radius * 1.2
        mask = ((offset / rod.reshape((dims,) + (1,) * dims)) ** 2).sum(0) < 1.0
    mask &= body  # a no-op from size 8 on; smaller images may clip the shape
    tissue[mask] = len(LEVELS) - 1
    return tissue, mask.astype(np.uint8)


@dataclass(frozen=True)
class PhantomSettings:
    """What the dataset argument sets; a registration's defaults replace these."""

    size: int = 28
    channels: int = 1
    count: int = 1024
    classes: int = 4

    def __post_init__(self):
        if not 1 <= self.classes <= len(SHAPES):
            raise ValueError(f"classes must be 1 to {len(SHAPES)}, got {self.classes}")
        if self.size < 4 or self.channels < 1 or self.count < 1:
            raise ValueError(f"size must be >= 4, channels and count >= 1, got size {self.size}, "
                             f"channels {self.channels}, count {self.count}")


def parse_settings(argument: str | None, defaults: dict[str, int], dataset: str) -> PhantomSettings:
    """Parse `key=value,key=value` over `defaults`, checking names, types and ranges."""
    what = f"dataset '{dataset}'"
    given = parse_options(PhantomSettings, split_pairs(argument, what, f"{dataset}:size=32,count=256"), what)
    try:
        return PhantomSettings(**{**defaults, **given})
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


class Phantoms(DatasetFactory):
    """Phantoms of one dimensionality; settings from the dataset argument."""

    takes_argument = True

    def __init__(self, spatial_dims: int, defaults: dict[str, int]):
        self.name = f"phantoms{spatial_dims}d"
        self.spatial_dims = (spatial_dims,)
        self.dims = spatial_dims
        self.defaults = defaults
        kind = "images" if spatial_dims == 2 else "volumes"
        self.description = (f"Synthetic {spatial_dims}D phantom {kind} (4 shape classes, shape masks), "
                            "generated offline by seed")

    def renamed(self, name: str) -> "Phantoms":
        """A copy registered under another name (for plugins that ship phantom variants)."""
        copy = Phantoms(self.dims, self.defaults)
        copy.name = name
        return copy

    def _settings(self, options: DatasetOptions) -> PhantomSettings:
        settings = parse_settings(options.argument, self.defaults, self.name)
        return settings if options.size is None else replace(settings, size=options.size)

    def info(self, options: DatasetOptions) -> DatasetInfo:
        s = self._settings(options)
        return DatasetInfo(
            name=self.name,
            spatial_dims=self.dims,
            channels=s.channels,
            size=(s.size,) * self.dims,
            task="multi-class",
            labels={i: SHAPES[i] for i in range(s.classes)},
            split_sizes={split: max(1, int(s.count * f)) for split, f in SPLIT_FRACTIONS.items()},
            mask_labels=dict(MASK_LABELS),
        )

    def build(self, split: str, options: DatasetOptions) -> ImageSplit:
        s = self._settings(options)
        info = self.info(options)
        images, labels, masks = generate_phantoms(
            info.split_sizes[split], s.size, self.dims, s.channels, s.classes,
            seed=options.seed + SPLIT_SEED_OFFSETS[split],
        )
        if not options.labeled:
            return ImageSplit(info, images)
        return ImageSplit(info, images, labels, masks=masks)


@hookimpl
def register_datasets(register):
    register(Phantoms(2, {"size": 28, "channels": 1, "count": 1024, "classes": 4}))
    register(Phantoms(3, {"size": 28, "channels": 1, "count": 512, "classes": 4}))
