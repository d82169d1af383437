"""The TaskContext protocol: the model's implementation satisfies it, and a plugin's fake does too."""

import inspect
import math

import torch

from medformer_core.api.context import TaskContext
from medformer_core.api.data import DatasetInfo
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.model.multitask import ModelTaskContext
from medformer_core.model.patches import grid_shape, patchify, unpatchify

INFO = DatasetInfo("fake", spatial_dims=2, channels=1, size=(16, 16))
MEMBERS = [name for name in vars(TaskContext) if not name.startswith("_")]


def model_context() -> ModelTaskContext:
    task = registries().tasks.get("mae")
    model = build_model("tiny", [INFO], [task], embed_dim=32, depth=1, heads=2, latents=4)
    return ModelTaskContext(model, task, INFO)


def test_protocol_lists_what_tasks_use():
    assert sorted(MEMBERS) == sorted(["info", "run", "encode", "decode", "patch_size", "num_patches",
                                      "patchify", "unpatchify"])


def test_model_task_context_satisfies_the_protocol():
    ctx = model_context()
    assert isinstance(ctx, TaskContext)
    for name in MEMBERS:
        declared = inspect.getattr_static(TaskContext, name)
        if isinstance(declared, property):
            assert hasattr(ctx, name), name
            continue
        ours = inspect.signature(getattr(ModelTaskContext, name)).parameters.values()
        wanted = inspect.signature(declared).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in wanted], name


class FakeContext:
    """A plugin author's stand-in for the model: latents are the (kept) patches, and the decoder
    predicts each queried patch as the mean latent."""

    def __init__(self, info: DatasetInfo, patch: int = 4):
        self.info = info
        self.run = [info]
        self.patch = (patch,) * info.spatial_dims

    def encode(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.patchify(image)  # [B, N, P]
        if keep is None:
            return patches
        return patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [B, n_keep, P]

    def decode(self, latents: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        queries = math.prod(grid_shape(tuple(self.info.size), self.patch)) if positions is None else positions.shape[1]
        return latents.mean(1, keepdim=True).expand(-1, queries, -1)  # [B, Q, P]

    def patch_size(self, image: torch.Tensor) -> tuple[int, ...]:
        return self.patch

    def num_patches(self, image: torch.Tensor) -> int:
        return math.prod(grid_shape(tuple(image.shape[2:]), self.patch))

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        return patchify(image, self.patch)

    def unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch, like.shape[1], tuple(like.shape[2:]))


def test_a_fake_context_trains_a_task():
    ctx: TaskContext = FakeContext(INFO)
    assert isinstance(ctx, TaskContext)
    batch = {"image": torch.rand(3, 1, 16, 16), "dataset": INFO.name, "spatial_dims": 2}
    result = registries().tasks.get("mae").forward(ctx, batch, torch.Generator().manual_seed(0))
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
