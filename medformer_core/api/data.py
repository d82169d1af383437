"""The data contract: a dataset split is a few arrays, a batch is one fancy-index into them."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medformer_core.api.errors import UsageError

TASK_TYPES = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression", "none")


@dataclass(frozen=True)
class DatasetOptions:
    """How to build a dataset: where its files are, which variant, how many labels to keep."""

    data_root: Path | None = None
    argument: str | None = None  # the ARG of `--dataset NAME:ARG` (a folder path, phantom settings)
    size: int | None = None  # spatial size the model wants; None keeps the native size
    seed: int = 0
    labeled: bool = True
    label_fraction: float = 1.0  # keep a stratified, seeded fraction of the labeled train split
    verify_md5: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds. `task` is one of TASK_TYPES (MedMNIST's names); `labels` maps class
    index to name. `mask_labels` maps the voxel classes of its segmentation masks to names (0 is
    the background); empty when the dataset has no masks. For crop datasets `size` is the crop."""

    name: str
    spatial_dims: int
    channels: int
    size: tuple[int, ...]
    task: str = "none"
    labels: dict[int, str] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    mask_labels: dict[int, str] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None  # voxel size in mm the samples were resampled to, if one

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def has_masks(self) -> bool:
        return len(self.mask_labels) >= 2


@dataclass
class ImageSplit:
    """One split held as arrays, so a batch is one index operation (fast, works with np.memmap).

    images: [M, C, *S] uint8 (scaled to [0, 1] on batching) or float32 already in [0, 1]
    labels: [N, L] int64 (class index, or 0/1 per column for multi-label) or None (unlabeled)
    index:  [N] sorted rows of `images` this split holds (a subset of a memory-mapped file without
            copying it); None holds every row. `len(split)` is N; labels align with the split.
    masks:  [M, *S] uint8 voxel classes (keys of `info.mask_labels`), row for row with `images`;
            None without segmentation masks.
    """

    info: DatasetInfo
    images: np.ndarray
    labels: np.ndarray | None = None
    index: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __post_init__(self):
        expected = 2 + self.info.spatial_dims
        if self.images.ndim != expected:
            raise ValueError(
                f"{self.info.name}: images have shape {tuple(self.images.shape)}, expected "
                f"{expected} dims [N, C, *S]"
            )
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"{self.info.name}: {len(self.labels)} labels for {len(self)} images")
        if self.masks is not None and self.masks.shape != self.images.shape[:1] + self.images.shape[2:]:
            raise ValueError(f"{self.info.name}: masks have shape {tuple(self.masks.shape)}, expected [M, *S] "
                             f"{(self.images.shape[0],) + tuple(self.images.shape[2:])}")

    def __len__(self) -> int:
        return len(self.images) if self.index is None else len(self.index)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def for_evaluation(self) -> "ImageSplit":
        """This split: its batches are the same on every call (a `CropSplit` fixes its crops)."""
        return self

    def state_dict(self) -> dict:
        """Random state to checkpoint: none (a `CropSplit` keeps its crop generator's)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def batch(self, indices) -> dict:
        """Gather `indices` into a batch dict: image [B, C, *S] float32 in [0, 1], label [B, L],
        mask [B, *S] int64 (when the split has masks)."""
        indices = np.sort(np.asarray(indices))  # sorted reads are faster on memory-mapped files
        rows = indices if self.index is None else self.index[indices]
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        image = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        batch = {"image": image, "dataset": self.info.name, "spatial_dims": self.info.spatial_dims}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(np.ascontiguousarray(self.labels[indices])).long()
        if self.masks is not None:
            batch["mask"] = torch.from_numpy(np.ascontiguousarray(self.masks[rows])).long()
        return batch

    def subset(self, positions: np.ndarray) -> "ImageSplit":
        """The samples at sorted `positions` of this split, sharing its image storage."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        rows = positions if self.index is None else self.index[positions]
        labels = None if self.labels is None else self.labels[positions]
        return ImageSplit(self.info, self.images, labels, rows, self.masks)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded, class-stratified `fraction` of `labels` [N, L].

    Single-label: each class keeps round(fraction * count) samples, at least one. Multi-label (L > 1):
    samples are grouped by their rarest positive column (all-negative rows form one group).
    """
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels))
    groups = labels[:, 0] if labels.shape[1] == 1 else _rarest_positive(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        count = max(1, round(fraction * len(members)))
        keep.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(keep))


def _rarest_positive(labels: np.ndarray) -> np.ndarray:
    """For each row of a multi-label matrix [N, L], its positive column with the fewest positives (-1: none)."""
    positives = labels.sum(axis=0)  # [L]
    rarity = np.where(labels > 0, positives[None, :], np.iinfo(np.int64).max)  # [N, L]
    return np.where(labels.any(axis=1), rarity.argmin(axis=1), -1)
