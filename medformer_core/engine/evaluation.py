"""Evaluating a model on a split: classification metrics exactly as MedMNIST's evaluator computes
them (its own getAUC / getACC), and per-class Dice for segmentation."""

import math

import numpy as np
import torch

from medformer_core.api.data import ImageSplit
from medformer_core.api.errors import MedformerError
from medformer_core.engine.dice import dice_per_class, summarize_dice


def medmnist_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """AUC and ACC of scores `y_score` [N, K] against labels `y_true` [N, L] for a MedMNIST task type.

    AUC is NaN when the labels hold a single class (it is undefined there).
    """
    try:  # imported here: every other command runs without the medmnist package
        from medmnist.evaluator import getACC, getAUC
    except ImportError:
        raise MedformerError("test metrics need the medmnist package, which is not installed",
                             hint="install it with `pip install --no-deps medmnist==3.0.2`") from None
    try:
        auc = float(getAUC(y_true, y_score, task))
    except ValueError:
        auc = math.nan
    return {"auc": auc, "acc": float(getACC(y_true, y_score, task))}


def _batches(split: ImageSplit, batch_size: int):
    """The whole split in order, as batches of at most batch_size."""
    for start in range(0, len(split), batch_size):
        yield split.batch(np.arange(start, min(start + batch_size, len(split))))


@torch.no_grad()
def predict_split(model, split: ImageSplit, device: torch.device, batch_size: int = 256,
                  task: str = "supervised") -> tuple[np.ndarray, np.ndarray]:
    """Scores of `model.predict` over a whole labeled split: (y_true [N, L], y_score [N, K])."""
    if split.labels is None:
        raise ValueError(f"{split.info.name}: cannot evaluate an unlabeled split")
    model.eval()
    scores = [model.predict({**batch, "image": batch["image"].to(device)}, task=task).float().cpu()
              for batch in _batches(split, batch_size)]
    return np.asarray(split.labels), torch.cat(scores).numpy()


@torch.no_grad()
def segmentation_metrics(model, split: ImageSplit, device: torch.device, batch_size: int = 16,
                         task: str = "segmentation") -> dict:
    """Per-class and mean foreground Dice of `model.predict` over a split with masks (see
    `summarize_dice`), each class averaged over the samples whose prediction or mask holds it."""
    if not split.has_masks:
        raise ValueError(f"{split.info.name}: cannot score segmentation on a split without masks")
    model.eval()
    scores = []
    for batch in _batches(split, batch_size):
        probabilities = model.predict({**batch, "image": batch["image"].to(device)}, task=task)  # [B, K, *S]
        scores.append(dice_per_class(probabilities.argmax(dim=1).cpu(), batch["mask"], probabilities.shape[1]))
    return summarize_dice(torch.cat(scores).numpy(), split.info.mask_labels)
