"""Registers a dataset of noise images and a pretext task through medformer's hooks."""

import numpy as np

from medformer_core import hookimpl
from medformer_core.data import DatasetInfo, DatasetOptions, ImageSplit
from medformer_core.interfaces import DatasetFactory, PretextTask


class NoiseImages(DatasetFactory):
    name = "example-noise"
    description = "Uniform noise images, 16x16, one channel (example plugin)"
    spatial_dims = (2,)
    channels = 1

    def info(self, options: DatasetOptions) -> DatasetInfo:
        return DatasetInfo(self.name, spatial_dims=2, channels=1, size=(16, 16),
                           split_sizes={"train": 64, "val": 16, "test": 16})

    def build(self, split: str, options: DatasetOptions) -> ImageSplit:
        info = self.info(options)
        rng = np.random.default_rng(options.seed)
        images = rng.integers(0, 256, size=(info.split_sizes[split], 1, 16, 16), dtype=np.uint8)
        return ImageSplit(info, images)


class Denoise(PretextTask):
    name = "example-denoise"
    description = "Predict a clean image from a noisy one (example plugin)"
    spatial_dims = (2,)


@hookimpl
def register_datasets(register):
    register(NoiseImages())


@hookimpl
def register_pretext_tasks(register):
    register(Denoise())
