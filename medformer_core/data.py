"""The data contract: a dataset split is a pair of arrays, a batch is one fancy-index into them."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TASK_TYPES = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression", "none")


@dataclass(frozen=True)
class DatasetOptions:
    """How to build a dataset: where its files are, which variant, how many labels to keep."""

    data_root: Path | None = None
    argument: str | None = None  # the ARG of `--dataset NAME:ARG` (a folder path, phantom settings)
    size: int | None = None  # spatial size the model wants; None keeps the native size
    seed: int = 0
    labeled: bool = True
    label_fraction: float = 1.0
    verify_md5: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds. `task` is one of TASK_TYPES (MedMNIST's names); `labels` maps class
    index to name; `num_outputs` is the number of label columns a supervised head predicts."""

    name: str
    spatial_dims: int
    channels: int
    size: tuple[int, ...]
    task: str = "none"
    labels: dict[int, str] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass
class ImageSplit:
    """One split held as arrays, so a batch is one index operation (fast, works with np.memmap).

    images: [N, C, *S] uint8 (scaled to [0, 1] on batching) or float32 already in [0, 1]
    labels: [N, L] int64 (class index, or 0/1 per column for multi-label) or None (unlabeled)
    """

    info: DatasetInfo
    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        expected = 2 + self.info.spatial_dims
        if self.images.ndim != expected:
            raise ValueError(
                f"{self.info.name}: images have shape {tuple(self.images.shape)}, expected "
                f"{expected} dims [N, C, *S]"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{self.info.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices) -> dict:
        """Gather `indices` into a batch dict: image [B, C, *S] float32 in [0, 1], label [B, L]."""
        indices = np.sort(np.asarray(indices))  # sorted reads are faster on memory-mapped files
        images = torch.from_numpy(np.ascontiguousarray(self.images[indices]))
        image = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        batch = {"image": image, "dataset": self.info.name, "spatial_dims": self.info.spatial_dims}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(np.ascontiguousarray(self.labels[indices])).long()
        return batch
