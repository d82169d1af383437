"""Dice for segmentation: a soft Dice loss on probabilities and the hard per-class Dice metric.

Class 0 is the background: the loss and the mean Dice average the foreground classes 1..K-1.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean foreground soft Dice of logits [B, K, *S] against classes target [B, *S] int64.

    Sums run over the whole batch (batch Dice); a class absent from both target and prediction
    scores 1, so it adds no loss.
    """
    probabilities = torch.softmax(logits.float(), dim=1)  # [B, K, *S]
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()  # [B, K, *S]
    axes = [0] + list(range(2, logits.ndim))
    overlap = (probabilities * one_hot).sum(axes)  # [K]
    total = probabilities.sum(axes) + one_hot.sum(axes)  # [K]
    dice = (2 * overlap + eps) / (total + eps)
    return 1.0 - dice[1:].mean()


def dice_per_class(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice per sample and class: prediction, target [B, *S] int64 -> [B, K] float.

    A class absent from both a sample's prediction and target is NaN there (nothing to score).
    """
    b = prediction.shape[0]
    predicted = F.one_hot(prediction.reshape(b, -1), num_classes).float()  # [B, V, K]
    actual = F.one_hot(target.reshape(b, -1), num_classes).float()
    overlap = (predicted * actual).sum(1)  # [B, K]
    total = predicted.sum(1) + actual.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.full_like(total, math.nan))


def summarize_dice(scores: np.ndarray, names: dict[int, str]) -> dict:
    """Per-sample Dice [N, K] -> {"dice": {class name: mean over the samples that score it},
    "mean_dice": mean of the foreground classes}; a class no sample scores is NaN."""
    with np.errstate(invalid="ignore"):
        means = [float(np.nanmean(column)) if np.isfinite(column).any() else math.nan for column in scores.T]
    foreground = [m for m in means[1:] if not math.isnan(m)]
    return {"dice": {names.get(k, str(k)): means[k] for k in range(1, len(means))},
            "mean_dice": float(np.mean(foreground)) if foreground else math.nan}
