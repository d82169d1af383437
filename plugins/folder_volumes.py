"""The folder dataset's crop mode: every scan prepared once at a target spacing and cached on disk.

`prepare_volumes` reads each scan (and its mask), normalises intensities, converts channels,
resamples to `spacing` mm (None keeps the native grid) and stores it as uint8 `.npy` files in one
folder per scan under $MEDFORMER_CACHE_DIR/folder-volumes, keyed by the preparation settings and
the files' paths, sizes and mtimes. Later runs, other splits and other label fractions reuse it;
crops are then read from these files memory-mapped, so an epoch never decodes a `.nii.gz` again.

Worker threads prepare several scans at once (decoding, resampling and file writes release the
GIL). A lock file per scan lets several processes (DDP ranks) share the cache: the first prepares
the scan, the others wait for it and read it.
"""

import fcntl
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medformer_core import MedformerError, Volume, atomic_write
from medformer_core.api.resampling import grid_for_spacing, resample
from medformer_plugins.folder_masks import check_mask
from medformer_plugins.folder_preprocess import convert_channels, normalize, to_uint8, warn_non_finite
from medformer_plugins.folder_readers import Sample, describe_error, read_sample
from medformer_plugins.medmnist_files import cache_dir

VOLUME_CACHE_VERSION = 1
FOREGROUND_POINTS = 4096  # foreground voxels kept per scan for foreground-centred crops
FOREGROUND_LEVEL = 26  # uint8 intensity (0.1 of the range) above which a voxel of a scan without a mask counts


@dataclass(frozen=True)
class Preparation:
    """How scans become volumes; every field is part of the cache key."""

    intensity: str
    window: tuple[float, float]
    percentiles: tuple[float, float]
    channels: int
    spacing: tuple[float, ...] | None  # mm per axis, or None for the native grid


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def prepare_volumes(pairs: list[tuple[Sample, Sample | None]], root: Path, preparation: Preparation,
                    classes: dict[int, str], workers: int) -> tuple[list[Volume], list[str], list[tuple[str, str]]]:
    """Volumes of (scan, mask or None) `pairs`, in order; returns (volumes, their keys, failed
    (key, reason) of scans that could not be read). A bad mask raises a DataError naming the file."""

    def one(pair):
        try:
            return prepare_volume(pair[0], pair[1], root, preparation, classes)
        except MedformerError:
            raise
        except Exception as exc:  # an unreadable file is skipped, never fatal
            return describe_error(exc)

    if workers > 1 and len(pairs) > 1:
        with ThreadPoolExecutor(min(workers, len(pairs))) as pool:
            outcomes = list(pool.map(one, pairs))
    else:
        outcomes = [one(pair) for pair in pairs]
    volumes, keys, failed = [], [], []
    for (sample, _), outcome in zip(pairs, outcomes):
        if isinstance(outcome, Volume):
            volumes.append(outcome)
            keys.append(sample.key)
        else:
            failed.append((sample.key, outcome))
    return volumes, keys, failed


def prepare_volume(sample: Sample, mask: Sample | None, root: Path, preparation: Preparation,
                   classes: dict[int, str]) -> Volume:
    """The cached volume of one scan, prepared first if the cache does not hold it yet."""
    folder = cache_dir() / "folder-volumes" / volume_key(sample, mask, preparation)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "meta.json").is_file():
            image, labels = _prepared_arrays(sample, mask, root, preparation, classes)
            _store(folder, image, labels, sample.key)
    return _read_volume(folder)


def volume_key(sample: Sample, mask: Sample | None, preparation: Preparation) -> str:
    digest = hashlib.sha1(json.dumps([VOLUME_CACHE_VERSION, repr(preparation)]).encode())
    for path in sample.paths + (mask.paths if mask else []):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def _prepared_arrays(sample: Sample, mask: Sample | None, root: Path, preparation: Preparation,
                     classes: dict[int, str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and prepare one scan: image [C, *S'] uint8 and mask [*S'] uint8 (or None) on the target grid."""
    scan = read_sample(sample, root)
    warn_non_finite(scan, sample.key)
    image = convert_channels(normalize(scan, preparation.intensity, preparation.window, preparation.percentiles),
                             preparation.channels)  # [C, *S] float32 in [0, 1]
    labels = None
    if mask is not None:
        labels = check_mask(read_sample(mask, root).array, image.shape[1:], mask, sample, classes)  # [*S]
    spacing = scan.spacing
    del scan  # the native array: only one full-size copy in memory at a time
    if preparation.spacing is not None:
        target = grid_for_spacing(image.shape[1:], spacing, preparation.spacing)
        image = resample(torch.from_numpy(image), target).numpy()
        if labels is not None:
            labels = resample(torch.from_numpy(labels[None].astype(np.float32)), target, nearest=True)[0].numpy()
    return to_uint8(image), None if labels is None else labels.astype(np.uint8)


def _store(folder: Path, image: np.ndarray, labels: np.ndarray | None, key: str) -> None:
    """Write the scan's folder atomically: image.npy, mask.npy, foreground.npy, meta.json."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little"))
    points = foreground_points(image, labels, rng)
    with atomic_write(folder) as temp:
        temp.mkdir()
        np.save(temp / "image.npy", image)
        if labels is not None:
            np.save(temp / "mask.npy", labels)
        np.save(temp / "foreground.npy", points)
        (temp / "meta.json").write_text(json.dumps({"shape": list(image.shape), "mask": labels is not None}))


def foreground_points(image: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Up to FOREGROUND_POINTS random foreground voxels [K, dims] int32: mask > 0 when there is a
    mask, else voxels brighter than FOREGROUND_LEVEL in some channel."""
    foreground = labels > 0 if labels is not None else (image > FOREGROUND_LEVEL).any(axis=0)
    flat = np.flatnonzero(foreground)
    if len(flat) > FOREGROUND_POINTS:
        flat = np.sort(rng.choice(flat, FOREGROUND_POINTS, replace=False))
    return np.stack(np.unravel_index(flat, foreground.shape), axis=1).astype(np.int32)


def _read_volume(folder: Path) -> Volume:
    meta = json.loads((folder / "meta.json").read_text())
    return Volume(folder / "image.npy", tuple(meta["shape"]), np.load(folder / "foreground.npy"),
                  folder / "mask.npy" if meta["mask"] else None)
