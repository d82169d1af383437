"""How much of a model's pooled features comes from the image: the between-image share.

A head that reads a pooled feature can only learn from what differs between images. If every image
of a set gives nearly the same pooled vector, the head first learns the label prior and the gradient
into the encoder fades (docs/model.md). The share is measured on a batch:

    share = sum over features of the variance across images / the variance of all entries

1.0: the features' mean over the batch is the same in every dimension and all their spread comes
from the images; 0.0: every image gives the same vector.
"""

import torch


def between_image_share(features: torch.Tensor) -> float:
    """features [B, E] -> the share of their variance that comes from differences between rows."""
    features = features.double()
    total = (features - features.mean()).square().mean()
    between = features.var(dim=0, unbiased=False).mean()
    return float(between / total) if total > 0 else 0.0


@torch.no_grad()
def pooled_encoder_features(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A multitask model's encoder output for `batch` (one dataset), averaged over its latents: [B, E]."""
    return model.encoder(batch["image"], batch["dataset"]).mean(dim=1)
