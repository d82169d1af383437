"""Variable-size volumes read as fixed-size crops: the data contract for real-size scans.

A `CropSplit` holds volumes of any shape (one memory-mapped file each) and hands out batches of
crops [B, C, *crop], so the sampler, the engine and every task treat it like an `ImageSplit`. Each
volume gives `crops_per_volume` samples per epoch. A training split draws a new random crop for
every sample of every batch, centred near a foreground voxel with probability `foreground`; an
evaluation split (`random=False`) gives each sample the same seeded crop every time, so validation
numbers compare across epochs. An axis shorter than the crop is centred and padded with zeros.

Files are opened for each read and closed after it: memory does not grow with the number of
volumes, and worker threads read the crops of a batch in parallel.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medformer_core.api.data import DatasetInfo


@dataclass(frozen=True)
class Volume:
    """One preprocessed volume on disk: `image` holds [C, *S] uint8, `mask` (optional) [*S] uint8
    voxel classes; `foreground` [K, dims] int32 are sampled foreground voxel coordinates (K may be 0)."""

    image: Path
    shape: tuple[int, ...]  # [C, *S]
    foreground: np.ndarray
    mask: Path | None = None

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[1:]


@dataclass(frozen=True)
class CropSplit:
    """Samples are `slots` [N, 2] rows (volume index, crop number); `labels` [N, L] align with them.

    info.size is the crop size; `random` draws fresh crops per batch (training) or fixed ones per
    slot (evaluation); `seed` seeds both; `workers` threads read a batch's crops."""

    info: DatasetInfo
    volumes: tuple[Volume, ...]
    slots: np.ndarray
    labels: np.ndarray | None = None
    foreground: float = 0.5
    random: bool = True
    seed: int = 0
    workers: int = 1
    has_masks: bool = False  # every volume has a mask (an empty split of a dataset with masks too)
    _state: dict | None = None  # the training generator, shared by the splits derived from this one

    @classmethod
    def of(cls, info: DatasetInfo, volumes: list[Volume], crops_per_volume: int,
           volume_labels: np.ndarray | None = None, **settings) -> "CropSplit":
        """`crops_per_volume` samples per volume; `volume_labels` [V, L] are repeated for each."""
        settings.setdefault("has_masks", bool(volumes) and all(v.mask is not None for v in volumes))
        slots = np.array([(v, c) for v in range(len(volumes)) for c in range(crops_per_volume)],
                         dtype=np.int64).reshape(-1, 2)
        labels = None if volume_labels is None else np.asarray(volume_labels)[slots[:, 0]]
        return cls(info, tuple(volumes), slots, labels, **settings)

    def __post_init__(self):
        if self._state is None:
            object.__setattr__(self, "_state", {"rng": np.random.default_rng(self.seed)})
        if self.has_masks and any(v.mask is None for v in self.volumes):
            raise ValueError(f"{self.info.name}: has_masks, but a volume has no mask")
        if self.labels is not None and len(self.labels) != len(self.slots):
            raise ValueError(f"{self.info.name}: {len(self.labels)} labels for {len(self.slots)} crops")

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def crop(self) -> tuple[int, ...]:
        return tuple(self.info.size)

    def batch(self, indices) -> dict:
        """Crops of the samples at `indices`: image [B, C, *crop] float32 in [0, 1], label [B, L],
        mask [B, *crop] int64 (when every volume has one)."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        slots = self.slots[indices]
        starts = [self._start(int(v), int(c)) for v, c in slots]
        jobs = [(self.volumes[int(v)], start) for (v, _), start in zip(slots, starts)]
        if self.workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(min(self.workers, len(jobs))) as pool:
                pieces = list(pool.map(lambda job: self._read(*job), jobs))
        else:
            pieces = [self._read(*job) for job in jobs]
        image = torch.from_numpy(np.stack([p[0] for p in pieces])).float().div_(255.0)
        batch = {"image": image, "dataset": self.info.name, "spatial_dims": self.info.spatial_dims}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(np.ascontiguousarray(self.labels[indices])).long()
        if self.has_masks:
            batch["mask"] = torch.from_numpy(np.stack([p[1] for p in pieces])).long()
        return batch

    def subset(self, positions: np.ndarray) -> "CropSplit":
        """The samples at `positions`, sharing volumes (and the training generator) with this split."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        labels = None if self.labels is None else self.labels[positions]
        return replace(self, slots=self.slots[positions], labels=labels)

    def volume_subset(self, volumes: np.ndarray) -> "CropSplit":
        """Every sample of the volumes at indices `volumes`."""
        return self.subset(np.flatnonzero(np.isin(self.slots[:, 0], np.asarray(volumes))))

    def for_evaluation(self) -> "CropSplit":
        """The same samples with fixed crops, for features and scores that compare across calls."""
        return replace(self, random=False)

    def state_dict(self) -> dict:
        return {"rng": self._state["rng"].bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._state["rng"].bit_generator.state = state["rng"]

    # -- one crop ---------------------------------------------------------------------------------

    def _start(self, volume: int, crop_number: int) -> np.ndarray:
        """Corner [dims] of the crop of one sample (negative where the volume is padded)."""
        rng = self._state["rng"] if self.random else np.random.default_rng((self.seed, volume, crop_number))
        return crop_start(self.volumes[volume], self.crop, self.foreground, rng)

    def _read(self, volume: Volume, start: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_crop(np.load(volume.image, mmap_mode="r"), start, self.crop)
        mask = None
        if volume.mask is not None:
            mask = read_crop(np.load(volume.mask, mmap_mode="r")[None], start, self.crop)[0]
        return image, mask


def crop_start(volume: Volume, crop: tuple[int, ...], foreground: float, rng: np.random.Generator) -> np.ndarray:
    """A random crop corner [dims]: with probability `foreground` the crop holds a random foreground
    voxel at a random place, else it is uniform. Axes shorter than the crop get a centred, padded crop."""
    shape, size = np.array(volume.spatial), np.array(crop)
    room = np.maximum(shape - size, 0)  # [dims] the largest corner that keeps the crop inside
    if len(volume.foreground) and rng.random() < foreground:
        centre = volume.foreground[rng.integers(len(volume.foreground))]
        start = centre - rng.integers(0, size)  # the voxel lands anywhere in the crop
        start = np.clip(start, 0, room)
    else:
        start = np.array([rng.integers(0, r + 1) for r in room])
    return np.where(shape < size, -((size - shape) // 2), start)


def read_crop(array: np.ndarray, start: np.ndarray, crop: tuple[int, ...]) -> np.ndarray:
    """array [C, *S] -> [C, *crop] from corner `start`; parts outside the array are zero."""
    out = np.zeros((array.shape[0],) + tuple(crop), dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for begin, size, extent in zip(start, crop, array.shape[1:]):
        low, high = max(int(begin), 0), min(int(begin) + size, extent)
        source.append(slice(low, high))
        target.append(slice(low - int(begin), high - int(begin)))
    out[tuple(target)] = array[tuple(source)]
    return out
