"""Online kNN monitor: is pretraining helping, without fine-tuning?

The weighted k-nearest-neighbour classifier of DINO and solo-learn on frozen, mean-pooled,
L2-normalised encoder features: each query's k most cosine-similar train samples vote for their
labels with weight exp(similarity / T). Use from a training loop:

    monitor = KnnMonitor(train_split, val_split, max_train=5000, k=20)  # labeled splits of one dataset
    metrics = monitor.evaluate(model.encoder, device)                   # {"auc": ..., "acc": ...}
    record["knn"] = {monitor.name: metrics}
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medformer_core.api.data import ImageSplit, stratified_subset
from medformer_core.engine.evaluation import medmnist_metrics

MULTI_LABEL = "multi-label, binary-class"
SINGLE_LABEL = ("multi-class", "binary-class", "ordinal-regression")


@torch.no_grad()
def encode_split(encoder: nn.Module, split: ImageSplit, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Features [N, E] of every sample of `split`: the encoder's latents [B, M, E] averaged over M and
    L2-normalised, computed in eval mode on `device`. The encoder's train/eval mode is restored."""
    was_training = encoder.training
    encoder.eval()
    features = []
    try:
        for start in range(0, len(split), batch_size):
            batch = split.batch(np.arange(start, min(start + batch_size, len(split))))
            latents = encoder(batch["image"].to(device), split.info.name)  # [B, M, E]
            features.append(F.normalize(latents.float().mean(dim=1), dim=1))  # [B, E]
    finally:
        encoder.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: np.ndarray, query_features: torch.Tensor, task: str,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Weighted kNN scores of each query, in the layout `medmnist_metrics` takes for `task`.

    train_features: [N, E] and query_features: [Q, E], L2-normalised (cosine similarity is a dot product).
    train_labels:   [N, L] int, MedMNIST's layout (class index in column 0, or 0/1 per label).
    Returns multi-class, binary and ordinal: class probabilities [Q, K] (normalised votes);
    multi-label: each label's share of the vote that is positive [Q, L]. k is capped at N.
    """
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long, device=train_features.device)  # [N, L]
    if task == MULTI_LABEL:
        if labels.shape[1] != num_classes:
            raise ValueError(f"multi-label task with {num_classes} labels, but train labels have "
                             f"{labels.shape[1]} columns")
        targets = labels.float()  # [N, L]
    elif task in SINGLE_LABEL:
        targets = F.one_hot(labels[:, 0], num_classes).float()  # [N, K]
    else:
        raise ValueError(f"kNN needs a labeled task type, got '{task}'")
    k = min(k, len(labels))
    scores = []
    for start in range(0, len(query_features), chunk):
        query = query_features[start:start + chunk].to(train_features.device)  # [q, E]
        similarity, neighbours = (query @ train_features.T).topk(k, dim=1)  # [q, k], best first
        # exp(sim / T) up to a per-query factor (the best neighbour's), which normalising cancels
        weights = ((similarity - similarity[:, :1]) / temperature).exp()  # [q, k]
        votes = (weights[:, :, None] * targets[neighbours]).sum(dim=1)  # [q, K or L]
        scores.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(scores).cpu().numpy()


class KnnMonitor:
    """kNN AUC and ACC on the val split of one labeled dataset, with train features as the memory bank.

    The train split is cut to about `max_train` samples (a seeded, class-stratified subset, the same
    every time) so that an evaluation is cheap; both splits are re-encoded at each `evaluate`.
    """

    def __init__(self, train: ImageSplit, val: ImageSplit, max_train: int = 5000, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256, seed: int = 0):
        for split in (train, val):
            if split.labels is None or len(split) == 0:
                raise ValueError(f"{split.info.name}: the kNN monitor needs labeled, non-empty train and val splits")
        if train.info.name != val.info.name:
            raise ValueError(f"train split of '{train.info.name}' and val split of '{val.info.name}' differ")
        if len(train) > max_train:
            train = train.subset(stratified_subset(train.labels, max_train / len(train), seed))
        self.name = train.info.name
        self.train, self.val = train.for_evaluation(), val.for_evaluation()
        self.k, self.temperature, self.batch_size = k, temperature, batch_size

    def evaluate(self, encoder: nn.Module, device: torch.device) -> dict[str, float]:
        """{"auc": ..., "acc": ...} of the kNN classifier on the val split, with `encoder`'s features."""
        info = self.train.info
        train_features = encode_split(encoder, self.train, device, self.batch_size)  # [N, E]
        val_features = encode_split(encoder, self.val, device, self.batch_size)  # [V, E]
        scores = knn_scores(train_features, self.train.labels, val_features, info.task, info.num_classes,
                            self.k, self.temperature)
        return medmnist_metrics(np.asarray(self.val.labels), scores, info.task)
