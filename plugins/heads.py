"""Output heads `label`, `dense`, `segment` and `embedding`: small maps from query features [B, Q, E].

- label:     pools the queries, then LayerNorm (+ BatchNorm without affine with `batch_norm=True`)
             + Linear -> logits [B, num_outputs]. With `ordinal=True` it is a CORAL head (Cao et
             al., 2020): one shared weight vector and num_outputs ordered biases -> cumulative
             logits [B, num_outputs], logit k for P(y > k).
- dense:     per query LayerNorm + Linear -> the pixels of its patch [B, Q, channels * prod(patch)].
- segment:   per query LayerNorm + Linear -> `hidden` features per voxel of its patch (the
             upsampling), unpatchified; a residual 3x3(x3) convolution over them and the
             instance-normalised input image (a skip that sharpens boundaries), then a per-voxel
             Linear -> class logits [B, num_classes, *S].
- embedding: pools the queries, then a SimCLR projection MLP (+ BatchNorm after its first Linear with
             `batch_norm=True`) -> [B, out_dim].
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from medformer_core import OutputHead, hookimpl
from medformer_core.model.patches import unpatchify


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over [B, E] that normalises a training batch of one with the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:  # no batch statistics of one
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)
        return super().forward(x)


class LabelHead(nn.Module):
    """features [B, Q, E] -> logits [B, num_outputs] (cumulative logits when ordinal).

    With `batch_norm=True` the pooled feature is centred and scaled across the batch before the
    linear map (as MAE's linear probe does). Medical images of one set share most of their content
    (empty background, the same anatomy), so at first what an image adds to the pooled feature is
    about 1% of it; full-batch, without augmentation, the classifier then learns the label prior from
    the shared part and the gradient into the encoder vanishes. The batch norm gives the classifier
    only what differs between images (docs/model.md has what it does to fine-tuning). A training
    batch of one image is normalised with the running statistics. Leave it off for a task that
    decodes batches sharing their label (one dataset per batch): centring would erase that label.
    """

    def __init__(self, embed_dim: int, num_outputs: int, ordinal: bool = False, batch_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.center = BatchNorm(embed_dim, affine=False) if batch_norm else None
        self.ordinal = ordinal
        if ordinal:
            self.linear = nn.Linear(embed_dim, 1, bias=False)
            self.thresholds = nn.Parameter(torch.linspace(1.0, -1.0, num_outputs))
        else:
            self.linear = nn.Linear(embed_dim, num_outputs)
            nn.init.zeros_(self.linear.bias)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(features.mean(dim=1))  # [B, E]
        if self.center is not None:
            pooled = self.center(pooled)
        logits = self.linear(pooled)
        return logits + self.thresholds if self.ordinal else logits


class DenseHead(nn.Module):
    """features [B, Q, E] -> patches [B, Q, channels * prod(patch_size)]."""

    def __init__(self, embed_dim: int, channels: int, patch_size: tuple[int, ...]):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.linear = nn.Linear(embed_dim, channels * math.prod(patch_size))
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


class SegmentHead(nn.Module):
    """features [B, N, E] and image [B, channels, *S] -> voxel logits [B, num_classes, *S].

    Without `image` (no skip) it returns the per-patch logits [B, Q, num_classes * prod(patch)]
    in the dense layout, for any queried patches.
    """

    def __init__(self, embed_dim: int, channels: int, patch_size: tuple[int, ...], num_classes: int = 2,
                 hidden: int = 16):
        super().__init__()
        self.patch_size, self.hidden = tuple(patch_size), hidden
        self.norm = nn.LayerNorm(embed_dim)
        self.upsample = nn.Linear(embed_dim, hidden * math.prod(patch_size))
        conv = nn.Conv2d if len(patch_size) == 2 else nn.Conv3d
        self.refine = conv(hidden + channels, hidden, kernel_size=3, padding=1)
        self.classify = nn.Linear(hidden, num_classes)
        nn.init.trunc_normal_(self.upsample.weight, std=0.02)
        nn.init.zeros_(self.upsample.bias)
        nn.init.zeros_(self.classify.bias)

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        voxels = self.upsample(self.norm(features))  # [B, Q, hidden * prod(patch)]
        if image is None:
            b, q = voxels.shape[:2]
            per_voxel = voxels.reshape(b, q, self.hidden, -1).transpose(2, 3)  # [B, Q, prod(patch), hidden]
            return self.classify(per_voxel).transpose(2, 3).reshape(b, q, -1)  # [B, Q, K * prod(patch)]
        voxels = unpatchify(voxels, self.patch_size, self.hidden, tuple(image.shape[2:]))  # [B, hidden, *S]
        skip = F.instance_norm(image.to(voxels.dtype))  # each sample's channels at zero mean, unit variance
        voxels = voxels + F.gelu(self.refine(torch.cat([voxels, skip], dim=1)))
        return self.classify(voxels.movedim(1, -1)).movedim(-1, 1)  # [B, K, *S]


class EmbeddingHead(nn.Module):
    """features [B, Q, E] -> embedding [B, out_dim] (Linear -> GELU -> Linear on the pooled query).

    With `batch_norm=True` a BatchNorm follows the first Linear, as in SimCLR's projection head:
    it lets the embedding tell apart images that share most of their content (see LabelHead).
    """

    def __init__(self, embed_dim: int, out_dim: int = 128, hidden_dim: int | None = None, batch_norm: bool = False):
        super().__init__()
        hidden = hidden_dim or embed_dim
        self.norm = nn.LayerNorm(embed_dim)
        middle = [BatchNorm(hidden)] if batch_norm else []
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), *middle, nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(features.mean(dim=1)))


class Head(OutputHead):
    """Registers one head module class under a name."""

    def __init__(self, name: str, module: type[nn.Module], description: str, example_spec: dict, prediction: str,
                 example_inputs: dict | None = None):
        self.name = name
        self.module = module
        self.description = description
        self.example_spec = example_spec
        self.prediction = prediction
        self.example_inputs = example_inputs or {}

    def build(self, *, embed_dim: int, **spec) -> nn.Module:
        return self.module(embed_dim, **spec)

    def spec_parameters(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.module).parameters.values())[1:]  # after embed_dim


@hookimpl
def register_adapters(register):
    register(Head("label", LabelHead, "Class logits (binary, multi-class, multi-label; CORAL for ordinal)",
                  {"num_outputs": 3},
                  "logits [B, num_outputs] from the task's queries, pooled (a label task asks for one query); "
                  "with ordinal, cumulative logits: logit k for P(y > k)"))
    register(Head("dense", DenseHead, "Pixels/voxels of each output patch, one query per patch",
                  {"channels": 2, "patch_size": (4, 4, 4)},
                  "patches [B, Q, channels * prod(patch_size)], one row of pixels per query; with "
                  "queries='patches' Q is the dataset's patch grid (or the positions the task picks, e.g. "
                  "MAE's masked patches) and the model fills in channels and patch_size"))
    register(Head("segment", SegmentHead, "Voxel class logits: per-patch upsampling, refined with the input image",
                  {"channels": 1, "patch_size": (2, 2), "num_classes": 3},
                  "with the input image (ctx.decode(latents, image=view.image)): logits [B, num_classes, *S]; "
                  "without it, per-patch logits [B, Q, num_classes * prod(patch_size)] in the dense layout",
                  example_inputs={"image": (2, 1, 2, 10)}))
    register(Head("embedding", EmbeddingHead, "Projection MLP to an embedding (contrastive tasks)",
                  {"out_dim": 16}, "embedding [B, out_dim] from the task's queries, pooled"))
