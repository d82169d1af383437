"""`segmentation`: per-voxel classes from the dataset's masks, the dense downstream task.

One query per patch of the dataset's grid feeds the `segment` head, which gets the input image as
a skip and returns voxel logits [B, K, *S] (K = the dataset's mask classes, 0 the background).
Loss: cross-entropy + `dice_weight` x soft Dice over the foreground classes (batch Dice). Metric:
the hard mean foreground Dice of the batch. `predict` gives class probabilities [B, K, *S].
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medformer_core import OutputSpec, PretextTask, TaskResult, hookimpl
from medformer_core.engine.dice import dice_per_class, soft_dice_loss


@dataclass(frozen=True)
class SegmentationOptions:
    dice_weight: float = 1.0  # weight of the soft Dice loss beside the cross-entropy
    hidden: int = 16  # voxel features of the segment head

    def __post_init__(self):
        if self.dice_weight < 0 or self.hidden < 1:
            raise ValueError(f"dice_weight must be >= 0 and hidden >= 1, got {self.dice_weight}, {self.hidden}")


class Segmentation(PretextTask):
    name = "segmentation"
    description = "Voxel classes of the dataset's segmentation masks (cross-entropy + Dice)"
    spatial_dims = (2, 3)
    needs_masks = True
    Options = SegmentationOptions

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        if reason is None and not info.has_masks:
            return "no segmentation masks"
        return reason

    def output_spec(self, info, run):
        return OutputSpec("segment", queries="patches",
                          options={"num_classes": len(info.mask_labels), "hidden": self.options.hidden})

    def logits(self, ctx, image: torch.Tensor) -> torch.Tensor:
        """image [B, C, *S] -> voxel logits [B, K, *S]."""
        return ctx.decode(ctx.encode(image), image=image)

    def forward(self, ctx, batch, generator):
        logits, mask = self.logits(ctx, batch["image"]), batch["mask"]  # [B, K, *S], [B, *S]
        loss = F.cross_entropy(logits.float(), mask) + self.options.dice_weight * soft_dice_loss(logits, mask)
        scores = dice_per_class(logits.argmax(dim=1), mask, logits.shape[1])[:, 1:]  # [B, K - 1]
        return TaskResult(loss, {"dice": scores.nanmean().nan_to_num(1.0).item()})

    def predict(self, ctx, batch):
        return torch.softmax(self.logits(ctx, batch["image"]), dim=1)


@hookimpl
def register_pretext_tasks(register):
    register(Segmentation())
