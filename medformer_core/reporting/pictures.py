"""PNG picture grids with Pillow: one row per sample, one titled column per stage.

A 2D image is shown as is; a 3D volume as its three orthogonal middle slices (axial, coronal,
sagittal) side by side. Three channels are shown as RGB, any other count as the first channel in
grey. Values are clamped to [0, 1]; small images are enlarged (nearest neighbour) to be legible.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

GAP = 4
TITLE_HEIGHT = 14
MIN_CELL = 96


def middle_slices(volume: torch.Tensor) -> list[torch.Tensor]:
    """volume [C, D, H, W] -> the three middle slices [C, H, W], [C, D, W], [C, D, H]."""
    _, d, h, w = volume.shape
    return [volume[:, d // 2], volume[:, :, h // 2], volume[:, :, :, w // 2]]


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """image [C, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    image = image.detach().float().clamp(0, 1).cpu()
    rgb = image[:3] if image.shape[0] == 3 else image[:1].expand(3, -1, -1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def views(sample: torch.Tensor) -> list[np.ndarray]:
    """sample [C, H, W] or [C, D, H, W] in [0, 1] -> uint8 [h, w, 3] pictures: the image, or the
    volume's three middle slices."""
    return [to_rgb(p) for p in ([sample] if sample.ndim == 3 else middle_slices(sample))]


def cell(sample: torch.Tensor) -> np.ndarray:
    """sample [C, H, W] or [C, D, H, W] -> one uint8 picture [h, w, 3] (3D: slices side by side)."""
    tiles = views(sample)
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, GAP), (0, 0))) for t in tiles]
    return np.concatenate(padded, axis=1)[:, :-GAP]


def picture_grid(columns: dict[str, torch.Tensor]) -> Image.Image:
    """columns: {title: [B, C, *S]} (same B) -> one image, a row per sample."""
    cells = [[cell(images[i]) for images in columns.values()] for i in range(len(next(iter(columns.values()))))]
    cell_h = max(c.shape[0] for row in cells for c in row)
    cell_w = max(c.shape[1] for row in cells for c in row)
    scale = max(1, MIN_CELL // cell_h)
    cell_h, cell_w = cell_h * scale, cell_w * scale
    width = len(columns) * (cell_w + GAP) + GAP
    height = TITLE_HEIGHT + len(cells) * (cell_h + GAP) + GAP
    canvas = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(columns):
        draw.text((GAP + j * (cell_w + GAP), 2), title, fill=(230, 230, 230))
    for i, row in enumerate(cells):
        for j, picture in enumerate(row):
            size = (picture.shape[1] * scale, picture.shape[0] * scale)
            tile = Image.fromarray(picture).resize(size, Image.NEAREST)
            canvas.paste(tile, (GAP + j * (cell_w + GAP), TITLE_HEIGHT + i * (cell_h + GAP)))
    return canvas


def save_picture_grid(columns: dict[str, torch.Tensor], path: Path) -> Path:
    """Write `picture_grid(columns)` as a PNG at `path` (folders created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture_grid(columns).save(path, format="PNG")
    return path
