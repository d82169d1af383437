"""Sliding-window inference: a model that takes fixed-size windows predicts a whole, larger scan.

Windows overlap by `overlap` of their side and their predictions are blended with a Gaussian
importance map (sigma = 1/8 of the window per axis, as nnU-Net does), so voxels near a window's
centre count most and seams vanish. A scan smaller than the window along an axis is zero-padded
at the end of that axis and the padding is cut off again.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """A separable Gaussian [*window], 1 at the centre, floored at 1e-3 so edges keep some weight."""
    weights = torch.ones(())
    for side in window:
        x = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
        axis = torch.exp(-0.5 * (x / max(side * sigma_scale, 1e-6)) ** 2)
        weights = weights[..., None] * axis
    return (weights / weights.max()).clamp_min(1e-3)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows covering [0, size) with the given overlap; the last ends at `size`."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window + 1, step))
    return starts if starts[-1] == size - window else starts + [size - window]


@torch.no_grad()
def sliding_window(image: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], window: tuple[int, ...],
                   overlap: float = 0.5, batch_size: int = 32, gaussian: bool = True) -> torch.Tensor:
    """image [C, *S] -> the blended prediction [K, *S] of `predict`: windows [B, C, *window] ->
    [B, K, *window] (e.g. class probabilities). `gaussian=False` averages the windows uniformly."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    size = tuple(image.shape[1:])
    pads = [max(0, w - s) for s, w in zip(size, window)]
    padded = F.pad(image, [p for pad in reversed(pads) for p in (0, pad)])  # [C, *S'] with S' >= window
    full = tuple(padded.shape[1:])
    weight = gaussian_importance(window) if gaussian else torch.ones(window)
    weight = weight.to(image.device)
    corners = torch.cartesian_prod(*[torch.tensor(window_starts(s, w, overlap)) for s, w in zip(full, window)])
    corners = corners.reshape(-1, len(window)).tolist()
    total, norm = None, torch.zeros(full, device=image.device)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        regions = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in chunk]
        out = predict(torch.stack([padded[(slice(None),) + region] for region in regions])).float()  # [B, K, *W]
        if total is None:
            total = torch.zeros((out.shape[1],) + full, device=image.device)
        for region, prediction in zip(regions, out):
            total[(slice(None),) + region] += prediction * weight
            norm[region] += weight
    return (total / norm)[(slice(None),) + tuple(slice(0, s) for s in size)]
