"""`supervised`: the dataset's own labels, so a run mixes labeled tasks with self-supervised ones.

One learned query per dataset, a `label` head, and the loss of its MedMNIST task type:

| task type                  | head outputs          | loss                    | predict() scores           |
| -------------------------- | --------------------- | ----------------------- | -------------------------- |
| multi-class                | K logits              | cross-entropy           | softmax [B, K]             |
| binary-class               | 2 logits              | cross-entropy           | softmax [B, 2]             |
| multi-label, binary-class  | L logits              | binary cross-entropy    | sigmoid [B, L]             |
| ordinal-regression         | K - 1 (CORAL)         | BCE on P(y > k)         | class probabilities [B, K] |

Ordinal regression uses CORAL (Cao, Mirjalili and Raschka, 2020): rank-consistent cumulative logits;
class probabilities are P(y > k - 1) - P(y > k), clipped at 0 and renormalised, so MedMNIST's
evaluator (argmax accuracy, one-vs-rest AUC) reads them like multi-class scores.
Labels [B, L] int64; a row with a negative entry counts as unlabeled and is left out of the loss.

Option `label_smoothing` (eps): the cross-entropy types train on (1 - eps) * one-hot + eps / K; the
BCE types (multi-label, ordinal) move each target toward 0.5: (1 - eps) * t + eps / 2.
Mixup: a batch may carry `mixup` = (partner [B] int64, weight w), its image being
w * x + (1 - w) * x[partner]; the targets are mixed alike, w * t + (1 - w) * t[partner].
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medformer_core import Chance, OutputSpec, PretextTask, TaskResult, View, hookimpl

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = (
    "multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression")


def ordinal_probabilities(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """CORAL logits [B, K - 1] (logit k: y > k) -> class probabilities [B, K]."""
    above = torch.sigmoid(cumulative_logits)
    ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
    bounds = torch.cat([ones, above, zeros], dim=1)  # P(y > k) for k = -1 .. K - 1
    probabilities = (bounds[:, :-1] - bounds[:, 1:]).clamp_min(0)
    return probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)


def soft_targets(kind: str, labels: torch.Tensor, width: int) -> torch.Tensor:
    """Labels [B, L] (non-negative) -> float targets [B, width] of the loss for MedMNIST task `kind`:
    one-hot classes (cross-entropy types), the label columns (multi-label), or P(y > k) (ordinal)."""
    if kind == MULTI_LABEL:
        return labels.float()
    if kind == ORDINAL:
        levels = torch.arange(width, device=labels.device)
        return (labels[:, :1] > levels).float()
    return F.one_hot(labels[:, 0], width).float()


def entropy(p: np.ndarray) -> float:
    """The entropy (nats) of the distribution p [K]."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def label_prior_chance(labels: np.ndarray, kind: str, num_classes: int, smoothing: float = 0.0) -> Chance:
    """The chance of a classifier that learned only the label prior of `labels` [N, L] (negative rows
    unlabeled): the loss of the best constant prediction, and the accuracy of always saying the
    most frequent answer."""
    labels = labels[(labels >= 0).all(axis=1)]
    if kind in (MULTI_LABEL, ORDINAL):  # one binary cross-entropy per column (ordinal: per P(y > k))
        columns = labels if kind == MULTI_LABEL else (labels[:, :1] > np.arange(num_classes - 1)).astype(int)
        p = (1 - smoothing) * columns.mean(axis=0) + smoothing / 2 if len(columns) else np.full(columns.shape[1], 0.5)
        loss = float(np.mean([entropy(np.array([q, 1 - q])) for q in p]))
        if kind == MULTI_LABEL:
            return Chance(loss, "accuracy", float(np.maximum(p, 1 - p).mean()))
    counts = np.bincount(labels[:, 0], minlength=num_classes).astype(float)
    prior = counts / counts.sum() if counts.sum() else np.full(num_classes, 1.0 / num_classes)
    if kind not in (MULTI_LABEL, ORDINAL):
        loss = entropy((1 - smoothing) * prior + smoothing / num_classes)
    return Chance(loss, "accuracy", float(prior.max()))


@dataclass(frozen=True)
class SupervisedOptions:
    label_smoothing: float = 0.0  # eps: toward uniform classes (CE) or toward 0.5 (BCE types); 0: off
    batch_norm: bool = False  # the label head's batch norm (see plugins/heads.py)

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


class Supervised(PretextTask):
    name = "supervised"
    description = "The dataset's own labels: binary, multi-class, multi-label or ordinal (CORAL)"
    spatial_dims = (2, 3)
    needs_labels = True
    Options = SupervisedOptions

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        if reason is None and info.task not in (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL):
            return f"no labels to learn (task type '{info.task}')"
        if reason is None and info.num_classes < 2:
            return f"{info.num_classes} label(s) listed; supervised needs at least 2"
        return reason

    def output_spec(self, info, run):
        options = {"num_outputs": info.num_classes, "batch_norm": self.options.batch_norm}
        if info.task == ORDINAL:
            options.update(num_outputs=info.num_classes - 1, ordinal=True)
        return OutputSpec("label", queries=1, options=options)

    def chance(self, data, batch_size):
        if data.labels is None:
            return None
        return label_prior_chance(data.labels, data.info.task, data.info.num_classes, self.options.label_smoothing)

    def make_view(self, ctx, batch, generator):
        return View(batch["image"], target=(batch["label"], batch.get("mixup")))  # label: [B, L]

    def loss(self, ctx, prediction, view):
        labels, mix = view.target  # labels [B, L]; mix: None or (partner [B], weight)
        labeled = (labels >= 0).all(dim=1)  # [B]
        if mix is not None:
            labeled = labeled & labeled[mix[0]]
        if not labeled.any():
            return TaskResult(prediction.sum() * 0.0, {})
        kind = ctx.info.task
        targets = soft_targets(kind, labels.clamp_min(0), prediction.shape[1])  # [B, K]
        if mix is not None:
            partner, weight = mix
            targets = weight * targets + (1.0 - weight) * targets[partner]
        logits, targets, labels = prediction[labeled], targets[labeled], labels[labeled]
        eps = self.options.label_smoothing
        if kind in (MULTI_LABEL, ORDINAL):
            loss = F.binary_cross_entropy_with_logits(logits, (1.0 - eps) * targets + 0.5 * eps)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=eps)
        if kind == MULTI_LABEL:
            accuracy = ((logits > 0) == labels.bool()).float().mean()
        elif kind == ORDINAL:
            accuracy = (ordinal_probabilities(logits).argmax(dim=1) == labels[:, 0]).float().mean()
        else:
            accuracy = (logits.argmax(dim=1) == labels[:, 0]).float().mean()
        return TaskResult(loss, {"accuracy": accuracy.item()})

    def predict(self, ctx, batch):
        logits = ctx.decode(ctx.encode(batch["image"]))
        if ctx.info.task == MULTI_LABEL:
            return torch.sigmoid(logits)
        if ctx.info.task == ORDINAL:
            return ordinal_probabilities(logits)
        return torch.softmax(logits, dim=1)


@hookimpl
def register_pretext_tasks(register):
    register(Supervised())
