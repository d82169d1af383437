"""Any model should drive its training loss toward zero on a few dozen images: a small Medformer,
with the default adapters and latent path and with the convolutional stems and pooled latents,
memorises 64 phantoms under random labels, 2D and 3D.

This catches the class of problem where the architecture, its initialisation or the latent
bottleneck holds the fit back (the loss then sits at the label prior's entropy, 0.69 here).
"""

import pytest
import torch

from medformer_core.api.data import DatasetInfo
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.engine.schedule import warmup_cosine

SMALL = dict(embed_dim=64, depth=2, heads=2, mlp_ratio=2.0, latents=16)
FITTING = {"default": {}, "conv stems, pooled latents": dict(adapter2d="conv2d", adapter3d="conv3d", latent_pool=True)}
SIZES = {2: 28, 3: 16}
SAMPLES, STEPS = 64, 150


def memorise(images: torch.Tensor, **overrides) -> list[float]:
    """Full-batch AdamW (warmup, cosine) on `images` [N, 1, *S] with random binary labels; the loss of every step."""
    info = DatasetInfo("memorise", images.ndim - 2, 1, tuple(images.shape[2:]), task="binary-class",
                       labels={0: "a", 1: "b"})
    generator = torch.Generator().manual_seed(0)
    batch = {"image": images, "dataset": info.name,
             "label": torch.randperm(len(images), generator=generator).remainder(2).unsqueeze(1)}
    torch.manual_seed(0)
    model = build_model("tiny", [info], [registries().tasks.get("supervised")], **{**SMALL, **overrides})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, 10, STEPS)
    losses = []
    for _ in range(STEPS):
        loss = model(batch, generator)["supervised"].loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("variant", FITTING)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_small_medformer_memorises_64_randomly_labeled_images(spatial_dims, variant, phantom_info, phantom_batch):
    phantoms = phantom_info(spatial_dims, size=SIZES[spatial_dims], count=SAMPLES)
    losses = memorise(phantom_batch(phantoms, count=SAMPLES)["image"], **FITTING[variant])
    assert losses[0] > 0.5  # it starts near the prior's entropy (0.69): the labels are not trivially fit
    assert max(losses[-5:]) < 0.05, losses[::10]
