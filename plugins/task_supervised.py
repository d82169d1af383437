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
"""

import torch
import torch.nn.functional as F

from medformer_core import hookimpl
from medformer_core.interfaces import OutputSpec, PretextTask, TaskResult, View

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = (
    "multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression")


def ordinal_probabilities(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """CORAL logits [B, K - 1] (logit k: y > k) -> class probabilities [B, K]."""
    above = torch.sigmoid(cumulative_logits)
    ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
    bounds = torch.cat([ones, above, zeros], dim=1)  # P(y > k) for k = -1 .. K - 1
    probabilities = (bounds[:, :-1] - bounds[:, 1:]).clamp_min(0)
    return probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)


class Supervised(PretextTask):
    name = "supervised"
    description = "The dataset's own labels: binary, multi-class, multi-label or ordinal (CORAL)"
    spatial_dims = (2, 3)
    needs_labels = True

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        if reason is None and info.task not in (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL):
            return f"no labels to learn (task type '{info.task}')"
        if reason is None and info.num_classes < 2:
            return f"{info.num_classes} label(s) listed; supervised needs at least 2"
        return reason

    def output_spec(self, info, run):
        if info.task == ORDINAL:
            return OutputSpec("label", queries=1, options={"num_outputs": info.num_classes - 1, "ordinal": True})
        return OutputSpec("label", queries=1, options={"num_outputs": info.num_classes})

    def make_view(self, ctx, batch, generator):
        return View(batch["image"], target=batch["label"])  # label: [B, L]

    def loss(self, ctx, prediction, view):
        labeled = (view.target >= 0).all(dim=1)
        if not labeled.any():
            return TaskResult(prediction.sum() * 0.0, {})
        logits, labels = prediction[labeled], view.target[labeled]
        kind = ctx.info.task
        if kind == MULTI_LABEL:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
            accuracy = ((logits > 0) == labels.bool()).float().mean()
        elif kind == ORDINAL:
            levels = torch.arange(logits.shape[1], device=labels.device)
            loss = F.binary_cross_entropy_with_logits(logits, (labels[:, :1] > levels).float())
            accuracy = (ordinal_probabilities(logits).argmax(dim=1) == labels[:, 0]).float().mean()
        else:
            loss = F.cross_entropy(logits, labels[:, 0])
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
