"""Any model should drive its training loss toward zero on a few dozen images: a small Medformer,
with the default adapters and latent path and with the convolutional stems and pooled latents,
memorises 64 phantoms under random labels, 2D and 3D.

This catches the class of problem where the architecture, its initialisation or the latent
bottleneck holds the fit back (the loss then sits at the label prior's entropy, 0.69 here).

Medical images of one set share most of their content (background, the same anatomy). On 64 images
that are one shared ball plus a small cube each, the `tiny` preset as users get it memorises them
full-batch. Before the encoder standardised its inputs per dataset, centred its positions and read
raw token values, it stayed at the prior's entropy there unless the label head had a batch norm
(as on 64 real AdrenalMNIST3D volumes, benchmarks/fit_check.py).
"""

import pytest
import torch

from medformer_core.api.data import DatasetInfo
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model

SMALL = dict(embed_dim=64, depth=2, heads=2, mlp_ratio=2.0, latents=16)
FITTING = {"default": {}, "conv stems, pooled latents": dict(adapter2d="conv2d", adapter3d="conv3d", latent_pool=True)}
SIZES = {2: 28, 3: 16}
SAMPLES, STEPS = 64, 150


def memorise(train_full_batch, images: torch.Tensor, steps: int = STEPS, small: bool = True,
             **overrides) -> list[float]:
    """Full-batch training on `images` [N, 1, *S] with random binary labels; the loss of every step."""
    info = DatasetInfo("memorise", images.ndim - 2, 1, tuple(images.shape[2:]), task="binary-class",
                       labels={0: "a", 1: "b"})
    generator = torch.Generator().manual_seed(0)
    batch = {"image": images, "dataset": info.name,
             "label": torch.randperm(len(images), generator=generator).remainder(2).unsqueeze(1)}
    torch.manual_seed(0)
    sizes = SMALL if small else {}  # small=False: the `tiny` preset as users get it
    task = registries().tasks.get("supervised")
    model = build_model("tiny", [info], [task], **{**sizes, **overrides})
    return train_full_batch(model, batch, "supervised", steps, generator)


@pytest.mark.slow
@pytest.mark.parametrize("variant", FITTING)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_small_medformer_memorises_64_randomly_labeled_images(spatial_dims, variant, phantom_info, phantom_batch,
                                                                 train_full_batch):
    phantoms = phantom_info(spatial_dims, size=SIZES[spatial_dims], count=SAMPLES)
    losses = memorise(train_full_batch, phantom_batch(phantoms, count=SAMPLES)["image"], **FITTING[variant])
    assert losses[0] > 0.5  # it starts near the prior's entropy (0.69): the labels are not trivially fit
    assert max(losses[-5:]) < 0.05, losses[::10]


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_tiny_preset_memorises_images_that_share_most_of_their_content(spatial_dims, shared_anatomy,
                                                                           train_full_batch):
    images = shared_anatomy(spatial_dims, SIZES[spatial_dims], SAMPLES)
    losses = memorise(train_full_batch, images, steps=60, small=False)
    assert losses[0] > 0.5
    assert max(losses[-5:]) < 0.4, losses[::10]  # the prior's entropy is 0.69
