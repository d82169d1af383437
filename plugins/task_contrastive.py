"""`contrastive`: SimCLR (Chen et al., 2020) on two augmented views, 2D and 3D.

Both views of a batch (medformer_core.engine.augment: flips, rot90, random resized crop, intensity jitter,
noise, blur) are encoded in one pass; one pooled query per view feeds a projection head; the loss
is NT-Xent: each view must pick its partner among the 2B - 1 others at temperature `temperature`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medformer_core import (
    OutputSpec,
    PretextTask,
    TaskResult,
    View,
    classification_chance,
    classification_result,
    hookimpl,
)


@dataclass(frozen=True)
class ContrastiveOptions:
    temperature: float = 0.2
    projection_dim: int = 128
    batch_norm: bool = True  # SimCLR's batch norm after the projection's first Linear (plugins/heads.py)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")


def nt_xent(embeddings: torch.Tensor, temperature: float) -> TaskResult:
    """embeddings [2B, D], rows i and i + B the two views of sample i -> the loss, with the top-1
    accuracy of finding each row's partner."""
    n = embeddings.shape[0] // 2
    z = F.normalize(embeddings, dim=1)
    similarity = z @ z.t() / temperature  # [2B, 2B]
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    partners = torch.arange(2 * n, device=z.device).roll(n)
    return classification_result(similarity, partners)


class Contrastive(PretextTask):
    name = "contrastive"
    description = "SimCLR NT-Xent between two augmented views of each image or volume"
    spatial_dims = (2, 3)
    Options = ContrastiveOptions

    def __init__(self, weight: float = 1.0, **options):
        super().__init__(weight, **options)
        self._augments = {}

    def augment(self, spatial_dims: int):
        from medformer_core.engine.augment import Augment  # the augmentation module is optional until used

        if spatial_dims not in self._augments:
            self._augments[spatial_dims] = Augment(spatial_dims)
        return self._augments[spatial_dims]

    def output_spec(self, info, run):
        options = {"out_dim": self.options.projection_dim, "batch_norm": self.options.batch_norm}
        return OutputSpec("embedding", queries=1, options=options)

    def chance(self, data, batch_size):
        return classification_chance(2 * batch_size - 1)  # each view picks its partner among 2B - 1 others

    def make_view(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        if image.shape[0] < 2:
            raise ValueError("contrastive needs a batch of at least 2 samples")
        augment = self.augment(image.ndim - 2)
        return View(torch.cat([augment(image, generator), augment(image, generator)]))  # [2B, C, *S]

    def loss(self, ctx, prediction, view):
        return nt_xent(prediction, self.options.temperature)


@hookimpl
def register_pretext_tasks(register):
    register(Contrastive())
