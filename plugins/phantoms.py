"""Synthetic phantoms: procedurally generated 2D images and 3D volumes, the embedded default dataset.

Each sample holds one shape on a noisy, smoothly shaded background; the class is the shape:
0 ball/disk, 1 box/square, 2 shell/ring, 3 rod (an elongated ellipsoid along a random axis).
Channels see the same anatomy with different contrasts, as MR sequences do. Each sample's
segmentation mask is the shape it draws: voxel class 1 ("shape") inside, 0 ("background") outside,
whatever the shape's kind, so the masks are ground truth exactly aligned with the images.

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
    dims = grid.shape[0]
    shape = (dims,) + (1,) * dims
    centre = rng.uniform(-0.3, 0.3, size=dims).astype(np.float32).reshape(shape)
    radius = rng.uniform(0.3, 0.55)
    x = grid - centre  # [dims, *S]
    if SHAPES[label] == "ball":
        mask = np.sqrt((x**2).sum(0)) < radius
    elif SHAPES[label] == "box":
        mask = np.abs(x).max(0) < radius * 0.8
    elif SHAPES[label] == "shell":
        r = np.sqrt((x**2).sum(0))
        mask = (r < radius) & (r > radius * 0.6)
    else:
        semi_axes = np.full(dims, radius * 0.35, dtype=np.float32)
        semi_axes[rng.integers(dims)] = radius * 1.4
        mask = ((x / semi_axes.reshape(shape)) ** 2).sum(0) < 1.0
    shading = (grid * rng.uniform(-0.15, 0.15, size=dims).astype(np.float32).reshape(shape)).sum(0)
    image = np.empty((channels,) + mask.shape, dtype=np.float32)
    for c in range(channels):
        foreground, background = rng.uniform(0.55, 0.95), rng.uniform(0.05, 0.3)
        if c % 2 == 1:  # odd channels invert the contrast, as T1 vs T2 do
            foreground, background = background, foreground
        noise = rng.normal(0.0, 0.05, size=mask.shape).astype(np.float32)
        image[c] = np.where(mask, foreground, background) + shading + noise
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask.astype(np.uint8)


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
