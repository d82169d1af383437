"""`TaskContext`: what a pretext task may use of the model while it works on one dataset's batch.

Part of the plugin API: `PretextTask` methods receive a TaskContext, never the model, so a task
depends only on this protocol. The engine passes `medformer_core.model.multitask.ModelTaskContext`; a
test may pass any object with these members.
"""

from typing import Protocol, runtime_checkable

import torch

from medformer_core.api.data import DatasetInfo


@runtime_checkable
class TaskContext(Protocol):
    """The model as one task sees it on one dataset's batch."""

    @property
    def info(self) -> DatasetInfo:
        """The dataset of the batch."""

    @property
    def run(self) -> list[DatasetInfo]:
        """Every dataset of the run, in the run's order."""

    def encode(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """image [B, C, *S] (any modality the model embeds) -> latents [B, M, E] (tokens
        [B, N | n_keep, E] when M == 0); keep [B, n_keep] int64 embeds only those patches."""

    def decode(self, latents: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, M, E] -> the task head's prediction (label: [B, K]; dense: [B, Q, C * prod(patch)]
        at positions [B, Q] int64, every patch when None)."""

    def patch_size(self, image: torch.Tensor) -> tuple[int, ...]:
        """The patch size of the input adapter of `image` [B, C, *S]: one entry per spatial axis."""

    def num_patches(self, image: torch.Tensor) -> int:
        """N, the number of patches of `image` [B, C, *S] (its padded grid)."""

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, C, *S] -> patches [B, N, C * prod(patch)], in the dense head's layout."""

    def unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """patches [B, N, C * prod(patch)] -> an image shaped like `like` [B, C, *S]."""
