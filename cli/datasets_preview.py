"""A montage of samples with their labels: images as tiles, volumes as three orthogonal middle slices."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from medformer_core.api.data import DatasetInfo
from medformer_core.reporting.pictures import views

TILE = 112  # pixels per tile side (nearest-neighbour upscaling keeps the pixels visible)
CAPTION = 14
GAP = 8  # pixels between samples


def label_text(info: DatasetInfo, label: np.ndarray | None) -> str:
    """A sample's label as words: the class name, or the positive findings of a multi-label task."""
    if label is None:
        return "unlabeled"
    if len(label) > 1:
        names = [info.labels.get(i, str(i)) for i, v in enumerate(label) if v]
        return ", ".join(names) if names else "none"
    value = int(label[0])
    name = info.labels.get(value, str(value))
    return name if name == str(value) else f"{value}: {name}"


def montage(info: DatasetInfo, images: np.ndarray, labels: np.ndarray | None, columns: int = 4) -> Image.Image:
    """images [N, C, *S] in [0, 1], labels [N, L] or None -> one RGB picture with a caption per sample."""
    per_sample = 1 if info.spatial_dims == 2 else 3
    rows = -(-len(images) // columns)
    cell = per_sample * TILE + GAP
    width, height = columns * cell, rows * (TILE + CAPTION)
    canvas = Image.new("RGB", (width, height + CAPTION + 4), "black")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"{info.name} ({info.task})" + ("  axial | coronal | sagittal" if per_sample == 3 else ""),
              fill="yellow")
    for i, image in enumerate(images):
        x0 = (i % columns) * cell
        y0 = CAPTION + 4 + (i // columns) * (TILE + CAPTION)
        for j, tile in enumerate(views(torch.as_tensor(image))):
            canvas.paste(Image.fromarray(tile).resize((TILE, TILE), Image.NEAREST), (x0 + j * TILE, y0))
        text = label_text(info, None if labels is None else labels[i])
        draw.text((x0 + 3, y0 + TILE + 1), text[: per_sample * TILE // 6], fill="white")
    return canvas
