"""`slice-position`: a 2D slice drawn from a 3D volume; predict its axis and relative position.

Per sample an axis a (0 = D, 1 = H, 2 = W) and an index i are drawn uniformly; the slice
volume[:, i] along a is encoded through the model's 2D input adapter for the volume's channel
count, so 2D and 3D inputs share one representation (and, with a 2D dataset of the same channels
in the run, one adapter). Targets: the axis (3 classes, cross-entropy) and the relative position
i / (size_a - 1) in [0, 1] (a sigmoid output, mean squared error times `position_weight`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medformer_core import Chance, InputSpec, OutputSpec, PretextTask, TaskResult, hookimpl
from medformer_core.api.draws import integers, uniform

AXES = 3


@dataclass(frozen=True)
class SlicePositionOptions:
    position_weight: float = 1.0

    def __post_init__(self):
        if self.position_weight < 0:
            raise ValueError(f"position_weight must be >= 0, got {self.position_weight}")


def take_slices(volume: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """volume [B, C, D, H, W], index [B] -> the slices [B, C, *in-plane] along `axis` (0, 1 or 2)."""
    moved = volume.movedim(2 + axis, 2)  # [B, C, S_axis, *in-plane]
    rows = torch.arange(volume.shape[0], device=volume.device)
    return moved[rows, :, index]


class SlicePosition(PretextTask):
    name = "slice-position"
    description = "Predict the axis and relative position of a 2D slice drawn from a 3D volume"
    spatial_dims = (3,)
    Options = SlicePositionOptions

    def extra_inputs(self, info):
        return [InputSpec(2, info.channels, tuple(info.size[1:]))]

    def output_spec(self, info, run):
        return OutputSpec("label", queries=1, options={"num_outputs": AXES + 1})

    def chance(self, data, batch_size):
        """Axis: ln 3 and accuracy 1/3. Position: the best constant guess (the middle) misses by the
        variance of a uniform slice index over n slices, relative: (n + 1) / (12 (n - 1))."""
        variance = sum((n + 1) / (12 * max(n - 1, 1)) for n in data.info.size) / AXES
        return Chance(loss=math.log(AXES) + self.options.position_weight * variance, metric="axis_accuracy",
                      value=1.0 / AXES)

    def draw(self, volume: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """-> axis [B] in {0, 1, 2}, slice index [B], relative position [B] in [0, 1]."""
        b = volume.shape[0]
        axis = integers(AXES, (b,), generator, volume.device)
        sizes = torch.tensor(volume.shape[2:], device=volume.device)[axis]  # [B]
        index = (uniform((b,), generator, volume.device) * sizes).long().clamp(max=sizes - 1)
        return axis, index, index.float() / (sizes - 1).clamp_min(1).float()

    def forward(self, ctx, batch, generator):
        volume = batch["image"]  # [B, C, D, H, W]
        axis, index, position = self.draw(volume, generator)
        rows, outputs = [], []
        for a in range(AXES):  # slices along one axis share a shape: encode them together
            along = (axis == a).nonzero().squeeze(1)
            if len(along):
                slices = take_slices(volume[along], a, index[along])  # [b, C, *in-plane]
                rows.append(along)
                outputs.append(ctx.decode(ctx.encode(slices)))
        prediction = torch.cat(outputs)[torch.cat(rows).argsort()]  # back in batch order: [B, 4]
        return self.score(prediction, axis, position)

    def score(self, prediction: torch.Tensor, axis: torch.Tensor, position: torch.Tensor) -> TaskResult:
        """prediction [B, 4] (3 axis logits, 1 position logit) against axis [B] and position [B]."""
        axis_logits, guess = prediction[:, :AXES], torch.sigmoid(prediction[:, AXES])
        loss = F.cross_entropy(axis_logits, axis) + self.options.position_weight * F.mse_loss(guess, position)
        metrics = {
            "axis_accuracy": (axis_logits.argmax(dim=1) == axis).float().mean().item(),
            "position_error": (guess - position).abs().mean().item(),
        }
        return TaskResult(loss, metrics)


@hookimpl
def register_pretext_tasks(register):
    register(SlicePosition())
