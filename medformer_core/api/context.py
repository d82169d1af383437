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
    """The model as one task sees it on one dataset's batch.

    Shapes: B samples, C channels, S the spatial size (H, W or D, H, W), E the model width, M the
    number of latents, N the patches of the zero-padded grid (row-major), P = C * prod(patch).

    The default `PretextTask.forward` is

        view = task.make_view(ctx, batch, generator)
        prediction = ctx.decode(ctx.encode(view.image, keep=view.keep), view.positions)
        return task.loss(ctx, prediction, view)

    A task that overrides `forward` may call `encode` several times (one per view) and decode
    each result; every call goes through the task's own output for this dataset.
    """

    @property
    def info(self) -> DatasetInfo:
        """The dataset of the batch: name, spatial_dims, channels, size, task type, labels."""

    @property
    def run(self) -> list[DatasetInfo]:
        """Every dataset of the run, in the run's order (e.g. the classes of a domain classifier)."""

    def encode(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """image [B, C, *S] (any modality the model embeds) -> latents [B, M, E] (tokens
        [B, N | n_keep, E] when M == 0); keep [B, n_keep] int64 embeds only those patches
        (indices into the row-major padded grid, e.g. MAE's visible ones). Gradients flow."""

    def decode(self, latents: torch.Tensor, positions: torch.Tensor | None = None,
               image: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, M, E] -> the prediction of the head the task's `OutputSpec` names:
        "label": logits [B, num_outputs]; "embedding": [B, out_dim]; "dense": [B, Q, P], one row
        of pixels per queried patch, at `positions` [B, Q] int64 (every patch, Q = N, when None);
        "segment" given the encoded `image` [B, C, *S] as a skip: voxel logits [B, K, *S]."""

    def patch_size(self, image: torch.Tensor) -> tuple[int, ...]:
        """The patch size of the input adapter of `image` [B, C, *S]: one entry per spatial axis."""

    def num_patches(self, image: torch.Tensor) -> int:
        """N, the number of patches of `image` [B, C, *S] (its grid, zero-padded at the end where the
        patch does not divide the size)."""

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, C, *S] -> patches [B, N, P], in the dense head's layout (compare a dense
        prediction with `ctx.patchify(target)`)."""

    def unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """patches [B, N, P] (e.g. a dense prediction over every patch) -> an image shaped like
        `like` [B, C, *S], the padding cut off."""
