"""Intensity normalisation and resampling for the folder plugin: native scans -> [C, *size] in [0, 1].

Intensity modes: `ct` maps a window (level, width) in HU to [0, 1]; `mr` clips each channel to
percentiles (default 0.5 and 99.5) and rescales; `minmax` rescales each channel's range; `none`
divides 8-bit pictures by 255. `auto` picks `ct` for CT (DICOM Modality, or values reaching -900
and below, as HU air does), `none` for 8-bit pictures and `mr` otherwise.

Fit modes, in physical units (voxel spacing from the file): `pad` scales the longest extent to
`size` and pads the rest (keeps proportions and the whole field of view); `crop` scales the
shortest extent to `size` and crops the centre; `stretch` resizes each axis to `size`.
"""

import logging

import numpy as np
import torch

from medformer_core.api.resampling import resample
from medformer_plugins.folder_readers import Scan

INTENSITY_MODES = ("auto", "ct", "mr", "minmax", "none")
FIT_MODES = ("pad", "crop", "stretch")
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
PERCENTILE_SAMPLES = 1_000_000  # voxels used to estimate percentiles


def normalize(scan: Scan, mode: str, window: tuple[float, float], percentiles: tuple[float, float]) -> np.ndarray:
    """scan.array [C, *S] native -> [C, *S] float32 in [0, 1]. NaN and infinite voxels take no part
    in choosing the mode or the percentiles, and end at 0."""
    x = scan.array
    finite = np.isfinite(x) if x.dtype.kind == "f" else None
    if finite is not None and finite.all():
        finite = None
    if mode == "auto":
        lowest = x.min() if finite is None else np.min(x, where=finite, initial=np.inf)
        mode = "ct" if scan.modality == "CT" or (scan.modality == "" and not scan.eight_bit and lowest <= -900) \
            else "none" if scan.eight_bit else "mr"
    if mode in ("ct", "none"):
        low, width = (window[0] - window[1] / 2, window[1]) if mode == "ct" else (0.0, 255.0)
        out = np.subtract(x, low, dtype=np.float32)  # one float32 copy, then in place: full-size CT fits
        out /= width
        np.clip(out, 0.0, 1.0, out=out)
    else:
        low, high = percentiles if mode == "mr" else (0.0, 100.0)
        out = np.empty_like(x, dtype=np.float32)
        for c in range(x.shape[0]):
            flat = x[c].reshape(-1)
            sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
            sample = sample[np.isfinite(sample)] if finite is not None else sample
            lo, hi = np.percentile(sample, [low, high]) if sample.size else (0.0, 0.0)
            if hi > lo:
                np.subtract(x[c], lo, out=out[c], dtype=np.float32)
                out[c] /= hi - lo
                np.clip(out[c], 0.0, 1.0, out=out[c])
            else:
                out[c] = 0.0
    if finite is not None:
        out[~finite] = 0.0
    return out


def warn_non_finite(scan: Scan, key: str) -> None:
    """One warning when the scan `key` holds NaN or infinite voxels (normalize sets them to 0)."""
    bad = int(scan.array.size - np.count_nonzero(np.isfinite(scan.array))) if scan.array.dtype.kind == "f" else 0
    if bad:
        logging.getLogger("medformer.data").warning(
            "%s: %d NaN or infinite voxel(s), left out of the intensity scaling and set to 0", key, bad)


def slices(volume: np.ndarray, spacing: tuple[float, ...], axis: str) -> tuple[list[np.ndarray], tuple[float, float]]:
    """volume [C, D, H, W] -> its 2D slices [C, *plane] along `axis`, and their in-plane spacing."""
    dim = SLICE_AXES[axis]
    planes = [np.take(volume, i, axis=1 + dim) for i in range(volume.shape[1 + dim])]
    return planes, tuple(s for i, s in enumerate(spacing) if i != dim)


def fit(array: np.ndarray, spacing: tuple[float, ...], size: int, mode: str, nearest: bool = False) -> np.ndarray:
    """array [C, *S] in [0, 1] -> [C, size, ...] (one side per spatial axis), resampled with torch;
    `nearest` resamples by nearest neighbour (class masks)."""
    shape = np.array(array.shape[1:], dtype=np.float64)
    extent = shape * np.array(spacing, dtype=np.float64)  # physical size per axis
    if mode == "stretch":
        target = np.full(len(shape), size)
    else:
        scale = size / (extent.max() if mode == "pad" else extent.min())
        target = np.maximum(1, np.round(extent * scale)).astype(int)
        target = np.minimum(target, size) if mode == "pad" else np.maximum(target, size)
    x = resample(torch.from_numpy(np.ascontiguousarray(array)), tuple(int(t) for t in target), nearest)
    return _pad_or_crop(x, size).numpy()


def convert_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """[c, *S] -> [channels, *S]: grey repeated to RGB, RGB to luminance."""
    if array.shape[0] == channels:
        return array
    if array.shape[0] == 1 and channels == 3:
        return np.repeat(array, 3, axis=0)
    weights = np.array([0.299, 0.587, 0.114], np.float32).reshape((3,) + (1,) * (array.ndim - 1))
    return (array * weights).sum(axis=0, keepdims=True)


def _pad_or_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre every spatial axis of x [C, *S] on `size`: pad with zeros or crop."""
    for axis in range(1, x.dim()):
        n = x.shape[axis]
        if n > size:
            x = x.narrow(axis, (n - size) // 2, size)
        elif n < size:
            pad_shape = list(x.shape)
            before = (size - n) // 2
            pad_shape[axis] = before
            after_shape = list(x.shape)
            after_shape[axis] = size - n - before
            x = torch.cat([x.new_zeros(pad_shape), x, x.new_zeros(after_shape)], dim=axis)
    return x


def to_uint8(array: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (the storage type of ImageSplit, as MedMNIST's)."""
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
