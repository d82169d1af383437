"""Output heads `label`, `dense` and `embedding`: small maps from query features [B, Q, E].

- label:     pools the queries, then LayerNorm + Linear -> logits [B, num_outputs]. With
             `ordinal=True` it is a CORAL head (Cao et al., 2020): one shared weight vector and
             num_outputs ordered biases -> cumulative logits [B, num_outputs], logit k for P(y > k).
- dense:     per query LayerNorm + Linear -> the pixels of its patch [B, Q, channels * prod(patch)].
- embedding: pools the queries, then a SimCLR projection MLP -> [B, out_dim].
"""

import inspect
import math

import torch
from torch import nn

from medformer_core import OutputHead, hookimpl


class LabelHead(nn.Module):
    """features [B, Q, E] -> logits [B, num_outputs] (cumulative logits when ordinal)."""

    def __init__(self, embed_dim: int, num_outputs: int, ordinal: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.ordinal = ordinal
        if ordinal:
            self.linear = nn.Linear(embed_dim, 1, bias=False)
            self.thresholds = nn.Parameter(torch.linspace(1.0, -1.0, num_outputs))
        else:
            self.linear = nn.Linear(embed_dim, num_outputs)
            nn.init.zeros_(self.linear.bias)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.linear(self.norm(features.mean(dim=1)))
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


class EmbeddingHead(nn.Module):
    """features [B, Q, E] -> embedding [B, out_dim] (Linear -> GELU -> Linear on the pooled query)."""

    def __init__(self, embed_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or embed_dim
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(features.mean(dim=1)))


class Head(OutputHead):
    """Registers one head module class under a name."""

    def __init__(self, name: str, module: type[nn.Module], description: str, example_spec: dict, prediction: str):
        self.name = name
        self.module = module
        self.description = description
        self.example_spec = example_spec
        self.prediction = prediction

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
    register(Head("embedding", EmbeddingHead, "Projection MLP to an embedding (contrastive tasks)",
                  {"out_dim": 16}, "embedding [B, out_dim] from the task's queries, pooled"))
