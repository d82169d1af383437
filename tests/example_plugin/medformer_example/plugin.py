"""Registers a dataset of noise images and a denoising pretext task through medformer's hooks."""

from dataclasses import dataclass

import numpy as np
import torch

from medformer_core import (
    DatasetFactory,
    DatasetInfo,
    DatasetOptions,
    ImageSplit,
    OutputSpec,
    PretextTask,
    TaskResult,
    View,
    hookimpl,
)


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
        return ImageSplit(info, images)  # images [N, C, H, W] uint8; labels [N, L] optional


@dataclass(frozen=True)
class DenoiseOptions:
    noise: float = 0.1  # std of the Gaussian noise added to the input


class Denoise(PretextTask):
    name = "example-denoise"
    description = "Reconstruct a clean image from a noisy one (example plugin)"
    spatial_dims = (2, 3)
    Options = DenoiseOptions

    def output_spec(self, info, run):
        return OutputSpec("dense", queries="patches")  # one query per patch, pixels back

    def make_view(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        noise = torch.randn(image.shape, generator=generator).to(image) * self.options.noise
        return View((image + noise).clamp(0, 1), target=image)

    def loss(self, ctx, prediction, view):
        reconstruction = ctx.unpatchify(prediction, view.target)  # [B, C, *S]
        return TaskResult((reconstruction - view.target).square().mean())


@hookimpl
def register_datasets(register):
    register(NoiseImages())


@hookimpl
def register_pretext_tasks(register):
    register(Denoise())
