"""The user's own scans: `--dataset folder:PATH[,key=value...]` or simply `--dataset PATH`.

A (nested) directory of NIfTI, DICOM (series or multi-frame) and PNG/JPEG/TIFF files becomes one
dataset whose samples share one shape [C, *([size] * dims)]: intensities are normalised (CT window,
MR percentiles, see folder_preprocess) and each sample is resampled to `size`. Volumes stay 3D, or
become 2D slices with `slices=axial|coronal|sagittal`.

Settings (in the argument, or in DatasetOptions.extra; the argument wins):

    size=64            side of every sample (default: DatasetOptions.size, else 64 for volumes, 128 for images)
    fit=pad            pad | crop | stretch        (how the physical field of view maps onto size)
    intensity=auto     auto | ct | mr | minmax | none
    window=0:2000      CT window level:width in HU (default spans -1000..1000 HU)
    percentiles=0.5:99.5   MR clipping percentiles
    slices=none        none | axial | coronal | sagittal
    channels=auto      auto (the most common count) | N; grey and RGB convert into each other
    labels=labels.csv  CSV with columns path,label[,mask][,split] (see folder_labels); default: labels.csv in the folder
    val=0.1,test=0.1   split fractions, drawn per sample by a stable hash of its path
    split_seed=0       seed of that hash

Crop mode, for scans at their real size (see folder_volumes): each scan is resampled once to a
voxel spacing instead of to `size`, cached on disk, and read as random crops (fixed, seeded crops
for val and test). Sizes and spacings are written x, y, z as scanners write them (`crop=96x96x64`
is 64 slices); one number is used for every axis.

    spacing=1.5        mm per voxel, e.g. 1.5 or 0.8x0.8x2.5, or native (the default with crop=)
    crop=96            crop size in voxels (default with spacing=: 96 for volumes, 128 for images)
    foreground=0.5     share of crops centred near a foreground voxel (mask > 0, else a bright voxel)
    crops=4            crops per scan and epoch (samples per scan)
    workers=4          threads that prepare scans and read crops (default: min(4, CPU cores))

Only regular files are read; a link to a file outside the folder is skipped (and listed) unless
`follow_links=true`.

Segmentation masks (see folder_masks): the Decathlon's `imagesTr/` + `labelsTr/`, `image.*`
beside `label.*` (`mask.*`, `seg.*`) in one folder, or any file named in a `mask` column of the
labels CSV (path,mask[,label][,split]). With masks, labeled splits hold the samples that
have one, each mask resampled with its image (nearest neighbour).

Splits: `train/`, `val/` (or `validation/`) and `test/` subfolders if present; else a `split`
column of the labels CSV; else the hashed fractions. Files that cannot be read are skipped and
listed in one warning (logger `medformer.data`); a folder with nothing readable is an error.
Processed splits are cached as `.npy` under `$MEDFORMER_CACHE_DIR/folder` (default
~/.cache/medformer), keyed by the settings and every file's size and mtime.
"""

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medformer_core import (
    CropSplit,
    DataError,
    DatasetFactory,
    DatasetInfo,
    DatasetOptions,
    ImageSplit,
    MedformerError,
    UsageError,
    atomic_write,
    hookimpl,
    parse_options,
    split_pairs,
    stratified_subset,
)
from medformer_core.api.options import settings_of
from medformer_plugins.folder_labels import SPLIT_FOLDERS, natural_order, read_labels
from medformer_plugins.folder_masks import check_mask, declared_classes, pair_masks
from medformer_plugins.folder_preprocess import (
    FIT_MODES,
    INTENSITY_MODES,
    SLICE_AXES,
    convert_channels,
    fit,
    normalize,
    slices,
    to_uint8,
    warn_non_finite,
)
from medformer_plugins.folder_readers import Sample, Scan, describe_error, find_samples, read_sample
from medformer_plugins.folder_volumes import Preparation, default_workers, prepare_volumes
from medformer_plugins.medmnist_files import cache_dir

log = logging.getLogger("medformer.data")
SUPPORTED = ".nii, .nii.gz, .dcm and DICOM without extension, .png, .jpg, .tif, .bmp"
CACHE_VERSION = 2
WARN_LIMIT = 20
DEFAULT_CROP = {2: 128, 3: 96}


@dataclass(frozen=True)
class Settings:
    root: Path
    size: int | None = None
    fit: Literal[FIT_MODES] = "pad"
    intensity: Literal[INTENSITY_MODES] = "auto"
    window: tuple[float, float] = (0.0, 2000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    slices: Literal[("none", *SLICE_AXES)] = "none"
    channels: Literal["auto"] | int = "auto"
    labels: str | None = None
    val: float = 0.1
    test: float = 0.1
    split_seed: int = 0
    spacing: str | None = None
    crop: str | None = None
    foreground: float = 0.5
    crops: int = 4
    workers: int | None = None
    follow_links: bool = False

    def __post_init__(self):
        if self.size is not None and self.size < 4:
            raise ValueError("size must be >= 4")
        if self.window[1] <= 0:
            raise ValueError("window width must be > 0")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.channels != "auto" and self.channels < 1:
            raise ValueError("channels must be auto or >= 1")
        if not 0 <= self.val + self.test < 1:
            raise ValueError("val + test must be in [0, 1)")
        if self.crop_mode:
            if self.size is not None:
                raise ValueError("size= resamples whole scans, crop= and spacing= read crops: give one of them")
            if self.slices != "none":
                raise ValueError("crops are read from whole volumes or images, not from slices=; drop one")
            if self.crop is not None:
                _axis_values(self.crop, int, "crop", minimum=8)
            if self.spacing not in (None, "native"):
                _axis_values(self.spacing, float, "spacing", minimum=1e-3)
        if not 0 <= self.foreground <= 1:
            raise ValueError("foreground must be in [0, 1]")
        if self.crops < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("crops and workers must be >= 1")

    @property
    def crop_mode(self) -> bool:
        return self.crop is not None or self.spacing is not None

    def crop_shape(self, dims: int) -> tuple[int, ...]:
        """The crop [Z, Y, X] (or [Y, X]) in voxels."""
        return _per_axis(_axis_values(self.crop or str(DEFAULT_CROP[dims]), int, "crop", 8), dims, "crop")

    def target_spacing(self, dims: int) -> tuple[float, ...] | None:
        """The voxel spacing [Z, Y, X] (or [Y, X]) in mm to resample to; None keeps each scan's own."""
        if self.spacing in (None, "native"):
            return None
        return _per_axis(_axis_values(self.spacing, float, "spacing", 1e-3), dims, "spacing")


KEYS = settings_of(Settings)


def _axis_values(text: str, kind: type, name: str, minimum: float) -> tuple:
    """`96` or `96x96x64` -> numbers, checked."""
    try:
        values = tuple(kind(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{name} must be a number or NxNxN, got '{text}'") from None
    if len(values) > 3 or min(values) < minimum:
        raise ValueError(f"{name} must be one to three numbers >= {minimum:g}, got '{text}'")
    return values


def _per_axis(values: tuple, dims: int, name: str) -> tuple:
    """x, y, z numbers (or one for all) -> per array axis [Z, Y, X] (or [Y, X])."""
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise UsageError(f"folder dataset: {name}={'x'.join(map(str, values))} has {len(values)} numbers for "
                         f"{dims}D scans", hint=f"give one number or {dims} (x, y{', z' if dims == 3 else ''})")
    return tuple(reversed(values))


def parse_settings(argument: str | None, extra: dict) -> Settings:
    """`PATH[,key=value...]` plus `extra` -> checked Settings (the argument's values win)."""
    if not argument:
        raise UsageError("the folder dataset needs a directory", hint="use --dataset folder:PATH or --dataset PATH")
    items = argument.split(",")
    pairs = []
    while len(items) > 1 and "=" in items[-1]:
        pairs.insert(0, items.pop())
    given = split_pairs(pairs, "folder dataset", "folder:PATH,size=64")
    values = {k: str(v) for k, v in extra.items() if k in KEYS} | given
    root = Path(",".join(items)).expanduser()
    try:
        return Settings(root, **parse_options(Settings, values, "folder dataset"))
    except ValueError as exc:
        raise UsageError(f"folder dataset: bad setting ({exc})",
                         hint=f"settings: {', '.join(KEYS)}; see `medformer datasets info folder:PATH`") from None


@dataclass
class FolderScan:
    """What the folder holds, from headers only: samples with their split and label."""

    samples: list[Sample]
    split: dict[str, str]  # key -> train/val/test
    labels: dict[str, int]  # key -> class index (only samples with a label row)
    class_names: dict[int, str]
    skipped: list[tuple[str, str]]
    dims: int
    channels: int
    unmatched_rows: int = 0
    masks: dict[str, Sample] = field(default_factory=dict)  # image key -> its mask
    mask_labels: dict[int, str] = field(default_factory=dict)


class Folder(DatasetFactory):
    """A directory of the user's scans (NIfTI, DICOM, PNG/JPEG/TIFF)."""

    name = "folder"
    description = "Your own scans: a directory of NIfTI, DICOM or PNG/JPEG/TIFF files (folder:PATH or PATH)"
    spatial_dims = (2, 3)
    takes_argument = True

    def __init__(self):
        self._scans: dict[tuple, FolderScan] = {}
        self._reported: set[tuple[str, str]] = set()

    def info(self, options: DatasetOptions) -> DatasetInfo:
        settings = parse_settings(options.argument, options.extra)
        scan = self._scan(settings)
        self._warn(settings, scan, [], options.labeled and bool(scan.labels))
        return self._info(settings, scan, options)

    def _info(self, settings: Settings, scan: FolderScan, options: DatasetOptions) -> DatasetInfo:
        if settings.crop_mode:
            size = settings.crop_shape(scan.dims)
        else:
            size = (self._size(settings, scan, options),) * scan.dims
        counts = Counter()
        for sample in scan.samples:
            if options.labeled and _unlabeled(sample, scan):
                continue
            counts[scan.split[sample.key]] += self._sample_count(sample, settings)
        return DatasetInfo(
            name=f"folder:{settings.root.resolve().name}",
            spatial_dims=scan.dims,
            channels=scan.channels,
            size=size,
            task=("binary-class" if len(scan.class_names) == 2 else "multi-class") if scan.class_names else "none",
            labels=dict(scan.class_names),
            split_sizes={split: counts.get(split, 0) for split in ("train", "val", "test")},
            mask_labels=dict(scan.mask_labels),
            spacing=settings.target_spacing(scan.dims) if settings.crop_mode else None,
        )

    def build(self, split: str, options: DatasetOptions) -> ImageSplit:
        if split not in ("train", "val", "test"):
            raise UsageError(f"the folder dataset has no split '{split}'", hint="choose train, val or test")
        settings = parse_settings(options.argument, options.extra)
        scan = self._scan(settings)
        info = self._info(settings, scan, options)
        with_labels = options.labeled and bool(scan.labels)
        chosen = [s for s in scan.samples
                  if scan.split[s.key] == split and not (options.labeled and _unlabeled(s, scan))]
        if settings.crop_mode:
            return self._build_crops(chosen, settings, scan, info, split, options)
        images, masks, keys, failed = self._load(chosen, settings, scan, info, split, options.labeled)
        self._warn(settings, scan, failed, with_labels)
        self._check_loaded(settings, split, chosen, keys)
        labels = np.array([[scan.labels[k]] for k in keys], dtype=np.int64).reshape(-1, 1) if with_labels else None
        data = ImageSplit(info, images, labels, masks=masks)
        if split == "train" and options.label_fraction < 1.0 and (labels is not None or masks is not None):
            groups = labels if labels is not None else np.zeros((len(data), 1), np.int64)
            data = data.subset(stratified_subset(groups, options.label_fraction, options.seed))
        return data

    def _build_crops(self, chosen: list[Sample], settings: Settings, scan: FolderScan, info: DatasetInfo, split: str,
                     options: DatasetOptions) -> CropSplit:
        """Crop mode: the chosen scans prepared at the target spacing (cached), read as crops."""
        with_masks = options.labeled and bool(scan.masks)
        preparation = Preparation(settings.intensity, settings.window, settings.percentiles, scan.channels,
                                  settings.target_spacing(scan.dims))
        pairs = [(s, scan.masks.get(s.key) if with_masks else None) for s in chosen]
        workers = settings.workers or default_workers()
        volumes, keys, failed = prepare_volumes(pairs, settings.root, preparation, scan.mask_labels, workers)
        self._warn(settings, scan, failed, options.labeled and bool(scan.labels))
        self._check_loaded(settings, split, chosen, keys)
        self._warn_small(settings, volumes, keys, info)
        labels = None
        if options.labeled and scan.labels:
            labels = np.array([[scan.labels[k]] for k in keys], dtype=np.int64).reshape(-1, 1)
        data = CropSplit.of(info, volumes, settings.crops, labels, foreground=settings.foreground,
                            random=split == "train", seed=options.seed, workers=workers, has_masks=with_masks)
        if split == "train" and options.label_fraction < 1.0 and (labels is not None or with_masks):
            groups = labels if labels is not None else np.zeros((len(volumes), 1), np.int64)
            data = data.volume_subset(stratified_subset(groups, options.label_fraction, options.seed))
        return data

    def _warn_small(self, settings: Settings, volumes: list, keys: list[str], info: DatasetInfo) -> None:
        """Say once per folder that scans smaller than the crop are padded."""
        small = [(k, v.spatial) for k, v in zip(keys, volumes) if any(n < c for n, c in zip(v.spatial, info.size))]
        marker = (str(settings.root), "#small")
        if small and marker not in self._reported:
            self._reported.add(marker)
            key, shape = small[0]
            log.warning("%s: %d scan(s) are smaller than the crop %s along some axis (e.g. %s, %s voxels); "
                        "their crops are padded with zeros", settings.root, len(small), _xyz(info.size), key,
                        _xyz(shape))

    @staticmethod
    def _check_loaded(settings: Settings, split: str, chosen: list[Sample], keys: list[str]) -> None:
        if chosen and not keys:
            raise DataError(f"{settings.root}: none of the {len(chosen)} {split} sample(s) could be read",
                            hint="see the warning above for the reasons")
        if split == "train" and not keys:
            raise DataError(f"{settings.root}: the train split is empty",
                            hint="add files, or lower the val/test fractions (e.g. folder:PATH,val=0,test=0)")

    def scale_intensities(self, array: np.ndarray, options: DatasetOptions) -> np.ndarray:
        """A new scan [C, *S] scaled by this folder's `intensity`, `window` and `percentiles`."""
        settings = parse_settings(options.argument, options.extra)
        scan = Scan(array.astype(np.float32), (1.0,) * (array.ndim - 1), eight_bit=array.dtype == np.uint8)
        return normalize(scan, settings.intensity, settings.window, settings.percentiles)

    # -- scanning -------------------------------------------------------------------------------

    def _scan(self, settings: Settings) -> FolderScan:
        root = settings.root
        if not root.exists():
            raise DataError(f"folder {root} does not exist", hint="check the path given to --dataset")
        if not root.is_dir():
            raise UsageError(f"{root} is not a directory", hint="the folder dataset reads a directory of scans")
        labels_path = self._labels_path(settings)
        memo = (str(root.resolve()), str(labels_path), settings.slices, settings.channels, settings.split_seed,
                settings.val, settings.test, settings.follow_links, _tree_fingerprint(root))
        if memo not in self._scans:
            self._scans[memo] = self._scan_uncached(settings, labels_path)
        return self._scans[memo]

    def _scan_uncached(self, settings: Settings, labels_path: Path | None) -> FolderScan:
        root = settings.root
        samples, skipped = find_samples(root, ignore={labels_path} if labels_path else set(),
                                        follow_links=settings.follow_links)
        table, split_column, unmatched, named_masks = read_labels(labels_path, {s.key for s in samples})
        samples, masks, unpaired = pair_masks(samples, named_masks)
        skipped += unpaired
        if not samples:
            found = f"; {len(skipped)} file(s) skipped: {_listing(skipped)}" if skipped else ""
            raise DataError(f"no images or volumes found in {root}{found}", hint=f"supported: {SUPPORTED}")
        has_volumes = any(len(s.shape) == 3 for s in samples)
        dims = 3 if has_volumes and settings.slices == "none" else 2
        if dims == 3:
            skipped += [(s.key, "a 2D image among volumes") for s in samples if len(s.shape) != 3]
            samples = [s for s in samples if len(s.shape) == 3]
        channels = _channel_count(samples, settings.channels)
        for s in samples:
            if s.channels != channels and {s.channels, channels} != {1, 3}:
                skipped.append((s.key, f"{s.channels} channels, the others have {channels}"))
        samples = [s for s in samples if s.channels == channels or {s.channels, channels} == {1, 3}]
        table = {k: v for k, v in table.items() if k in {s.key for s in samples}}
        values = sorted({v for v in table.values()}, key=natural_order)
        index = {v: i for i, v in enumerate(values)}
        names = {i: str(v) for v, i in index.items()}
        split = self._assign_splits(samples, settings, split_column, skipped)
        samples = [s for s in samples if s.key in split]
        masks = {k: m for k, m in masks.items() if k in split}
        return FolderScan(samples, split, {k: index[v] for k, v in table.items()}, names, sorted(skipped),
                          dims, channels, unmatched, masks, declared_classes(root) if masks else {})

    def _labels_path(self, settings: Settings) -> Path | None:
        if settings.labels is None:
            default = settings.root / "labels.csv"
            return default if default.is_file() else None
        path = Path(settings.labels).expanduser()
        path = path if path.is_absolute() else settings.root / path
        if not path.is_file():
            raise UsageError(f"labels file {path} not found",
                             hint="give labels=PATH (relative to the folder or absolute)")
        return path

    @staticmethod
    def _assign_splits(samples: list[Sample], settings: Settings, split_column: dict[str, str],
                       skipped: list) -> dict[str, str]:
        root_dirs = {p.name.lower() for p in settings.root.iterdir() if p.is_dir()}
        by_folder = "train" in root_dirs and bool(root_dirs & {"val", "validation", "test"})
        split = {}
        for s in samples:
            if by_folder:
                top = s.key.split("/", 1)[0].lower()
                if top not in SPLIT_FOLDERS:
                    skipped.append((s.key, "outside the train/val/test folders"))
                    continue
                split[s.key] = SPLIT_FOLDERS[top]
            elif s.key in split_column:
                split[s.key] = split_column[s.key]
            else:
                digest = hashlib.md5(f"{settings.split_seed}:{s.key}".encode()).digest()
                u = int.from_bytes(digest[:8], "little") / 2**64
                split[s.key] = "test" if u < settings.test else "val" if u < settings.test + settings.val else "train"
        return split

    # -- loading --------------------------------------------------------------------------------

    def _load(self, chosen: list[Sample], settings: Settings, scan: FolderScan, info: DatasetInfo, split: str,
              labeled: bool) -> tuple[np.ndarray, np.ndarray | None, list[str], list[tuple[str, str]]]:
        """Images [N, C, *size] uint8 of `chosen` (from the cache when it is fresh), their masks
        [N, *size] uint8 (labeled splits of a folder with masks; else None), keys per image."""
        shape = (scan.channels,) + tuple(info.size)
        pairs = [(s, scan.masks.get(s.key) if labeled else None) for s in chosen]
        with_masks = labeled and bool(scan.masks)
        key = _cache_key(settings, [p for pair in pairs for p in pair if p], shape, split)
        folder = cache_dir() / "folder" / key
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            masks = np.load(folder / "masks.npy", mmap_mode="r") if with_masks else None
            return (np.load(folder / "images.npy", mmap_mode="r"), masks, meta["keys"],
                    [tuple(f) for f in meta["failed"]])
        arrays, masks, keys, failed = [], [], [], []
        for sample, mask in pairs:
            try:
                pieces = self._process(sample, settings, scan.channels, info.size[0], mask, scan.mask_labels)
            except MedformerError:
                raise
            except Exception as exc:  # an unreadable file is skipped, never fatal
                failed.append((sample.key, describe_error(exc)))
                continue
            arrays += [image for image, _ in pieces]
            masks += [m for _, m in pieces if m is not None]
            keys += [sample.key] * len(pieces)
        images = np.stack(arrays) if arrays else np.zeros((0,) + shape, np.uint8)
        stacked = (np.stack(masks) if masks else np.zeros((0,) + shape[1:], np.uint8)) if with_masks else None
        _store(folder, images, {"keys": keys, "failed": failed}, stacked)
        return images, stacked, keys, failed

    @staticmethod
    def _process(sample: Sample, settings: Settings, channels: int, size: int, mask: Sample | None = None,
                 classes: dict[int, str] | None = None) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Read, normalise, (slice), convert channels, fit: one sample -> list of ([C, *size] uint8,
        its mask [*size] uint8 or None)."""
        scan = read_sample(sample, settings.root)
        warn_non_finite(scan, sample.key)
        array = normalize(scan, settings.intensity, settings.window, settings.percentiles)
        labels = None
        if mask is not None:  # one more channel, resampled alike but by nearest neighbour
            labels = check_mask(read_sample(mask, settings.root).array, array.shape[1:], mask, sample, classes)
            labels = labels[None].astype(np.float32)
        if array.ndim == 4 and settings.slices != "none":
            planes, spacing = slices(array, scan.spacing, settings.slices)
            mask_planes = slices(labels, scan.spacing, settings.slices)[0] if labels is not None else None
        else:
            planes, spacing, mask_planes = [array], scan.spacing, None if labels is None else [labels]
        images = [to_uint8(fit(convert_channels(p, channels), spacing, size, settings.fit)) for p in planes]
        if mask_planes is None:
            return [(image, None) for image in images]
        fitted = [fit(m, spacing, size, settings.fit, nearest=True)[0].astype(np.uint8) for m in mask_planes]
        return list(zip(images, fitted))

    def _size(self, settings: Settings, scan: FolderScan, options: DatasetOptions) -> int:
        return settings.size or options.size or (64 if scan.dims == 3 else 128)

    @staticmethod
    def _sample_count(sample: Sample, settings: Settings) -> int:
        if settings.crop_mode:
            return settings.crops
        if len(sample.shape) == 3 and settings.slices != "none":
            return sample.shape[SLICE_AXES[settings.slices]]
        return 1

    def _warn(self, settings: Settings, scan: FolderScan, failed: list, with_labels: bool) -> None:
        """One warning per load with the files not reported before in this process."""
        root = str(settings.root)
        new = [item for item in scan.skipped + failed if (root, item[0]) not in self._reported]
        self._reported.update((root, item[0]) for item in new)
        notes = []
        if new:
            notes.append(f"skipped {len(new)} file(s): {_listing(new)}")
        unlabeled = sum(1 for s in scan.samples if s.key not in scan.labels)
        if with_labels and unlabeled and (root, "#unlabeled") not in self._reported:
            self._reported.add((root, "#unlabeled"))
            notes.append(f"{unlabeled} sample(s) without a row in the labels CSV are left out of labeled splits")
        if scan.unmatched_rows and (root, "#rows") not in self._reported:
            self._reported.add((root, "#rows"))
            notes.append(f"{scan.unmatched_rows} row(s) of the labels CSV name no sample")
        if notes:
            log.warning("folder %s: %s", root, "; ".join(notes))


def _unlabeled(sample: Sample, scan: FolderScan) -> bool:
    """Whether a labeled split leaves `sample` out: it lacks a CSV label, or a mask in a folder with masks."""
    return bool(scan.labels) and sample.key not in scan.labels or bool(scan.masks) and sample.key not in scan.masks


def _channel_count(samples: list[Sample], wanted: str | int) -> int:
    if wanted != "auto":
        return int(wanted)
    counts = Counter(s.channels for s in samples)
    return max(counts, key=lambda c: (counts[c], c))


def _tree_fingerprint(root: Path) -> int:
    """A hash of every file's path, size and mtime: a changed folder is scanned again."""
    digest = hashlib.sha1()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            digest.update(f"{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return int.from_bytes(digest.digest()[:8], "little")


def _cache_key(settings: Settings, chosen: list[Sample], shape: tuple, split: str) -> str:
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, str(settings), shape, split]).encode())
    for sample in chosen:
        for path in sample.paths:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{settings.root.resolve().name}-{split}-{digest.hexdigest()[:16]}"


def _store(folder: Path, images: np.ndarray, meta: dict, masks: np.ndarray | None = None) -> None:
    """Write the processed split atomically; a cache that cannot be written is not an error."""
    try:
        with atomic_write(folder / "images.npy") as temp, open(temp, "wb") as f:
            np.save(f, images)
        if masks is not None:
            with atomic_write(folder / "masks.npy") as temp, open(temp, "wb") as f:
                np.save(f, masks)
        with atomic_write(folder / "meta.json") as temp:
            temp.write_text(json.dumps(meta))
    except OSError as exc:
        log.debug("could not cache %s: %s", folder, exc)


def _xyz(shape: tuple[int, ...]) -> str:
    """[Z, Y, X] -> "XxYxZ", the order scanners write sizes in."""
    return "x".join(map(str, reversed(shape)))


def _listing(items: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{key} ({reason})" for key, reason in items[:WARN_LIMIT])
    return shown + (f", and {len(items) - WARN_LIMIT} more" if len(items) > WARN_LIMIT else "")


@hookimpl
def register_datasets(register):
    register(Folder())
