"""Pretext tasks on images that share most of their content, as the images of one medical set do.

On 64 images that are one shared off-centre ball plus a small cube each, rotation and jigsaw leave
chance even without the batch norm their heads have by default (before the encoder's fix of
docs/model.md they needed it). Contrastive's batch norm is SimCLR's, in the projection.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medformer_core.api.data import DatasetInfo
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_plugins.heads import EmbeddingHead

SIZES = {2: 28, 3: 16}
SAMPLES, STEPS = 64, 60


def pretext_losses(train_full_batch, task_name: str, images: torch.Tensor) -> list[float]:
    """Full-batch training of the `tiny` preset on `images` [N, 1, *S] with one pretext task, its
    head without a batch norm (the encoder alone must make the images differ); the loss of every step."""
    info = DatasetInfo("shared", images.ndim - 2, 1, tuple(images.shape[2:]))
    torch.manual_seed(0)
    model = build_model("tiny", [info], [registries().tasks.get(task_name).with_options(batch_norm=False)])
    batch = {"image": images, "dataset": info.name}
    return train_full_batch(model, batch, task_name, STEPS, torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize(("task_name", "spatial_dims", "classes"),
                         [("rotation", 2, 4), ("rotation", 3, 24), ("jigsaw", 2, 100)])
def test_pretext_classifiers_leave_chance_on_images_that_share_most_of_their_content(
        task_name, spatial_dims, classes, shared_anatomy, train_full_batch):
    images = shared_anatomy(spatial_dims, SIZES[spatial_dims], SAMPLES, off_centre=True)
    losses = pretext_losses(train_full_batch, task_name, images)
    chance = math.log(classes)
    assert sum(losses[-5:]) / 5 < 0.6 * chance, losses[::10]


@pytest.mark.parametrize("task_name", ["rotation", "jigsaw", "contrastive"])
def test_the_batch_norm_option_reaches_the_pretext_head(task_name):
    info = DatasetInfo("shared", 2, 1, (12, 12))
    task = registries().tasks.get(task_name)

    def norms(options: dict) -> list[nn.Module]:
        head = build_model("tiny", [info], [task.with_options(**options)]).outputs[task_name][info.name].head
        return [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]

    assert len(norms({})) == 1  # on by default: each sample draws its own class, so centring erases no label
    assert norms({"batch_norm": False}) == []


def mean_cosine_between_samples(embeddings: torch.Tensor) -> float:
    """embeddings [B, D] -> the mean cosine similarity over pairs of different rows."""
    z = F.normalize(embeddings, dim=1)
    similarity = z @ z.t()  # [B, B]
    n = len(z)
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def test_the_projection_batch_norm_spreads_the_embeddings_of_near_identical_images():
    torch.manual_seed(0)
    features = 3 * torch.randn(1, 1, 32) + 0.03 * torch.randn(16, 1, 32)  # [B, Q, E]: 1% differs
    plain, normed = (EmbeddingHead(32, 16, batch_norm=flag).train() for flag in (False, True))
    assert mean_cosine_between_samples(plain(features)) > 0.99
    assert mean_cosine_between_samples(normed(features)) < 0.5


def test_the_projection_batch_norm_takes_a_batch_of_one_with_its_running_statistics():
    head = EmbeddingHead(8, 4, batch_norm=True).train()
    head(torch.randn(4, 1, 8))  # features [B, Q, E]: updates the running statistics
    one = torch.randn(1, 1, 8)
    assert torch.allclose(head(one), head.eval()(one))
