"""timm-style smoke tests over every registered plugin: each pretext task on 2D and 3D phantoms,
each input adapter, each output head: forward, backward, finite values. A task, adapter or head a
third party registers is picked up the same way (see the throw-away plugin at the end)."""

import math
from dataclasses import dataclass

import pytest
import torch

from medformer_core import hookimpl
from medformer_core.data import DatasetInfo, DatasetOptions
from medformer_core.interfaces import OutputSpec, PretextTask, TaskResult, View
from medformer_core.multitask import MultitaskModel, build_multitask_model
from medformer_core.plugins import plugin_manager, registries

TINY = dict(embed_dim=32, depth=1, heads=2, latents=8, mlp_ratio=2.0)
PHANTOM_SIZES = {2: 12, 3: 8}


def phantom_info(spatial_dims: int, size: int | None = None, channels: int = 1, count: int = 16) -> DatasetInfo:
    size = size or PHANTOM_SIZES[spatial_dims]
    options = DatasetOptions(argument=f"size={size},channels={channels},count={count}")
    return registries().datasets.get(f"phantoms{spatial_dims}d").info(options)


def phantom_batch(info: DatasetInfo, count: int = 4, start: int = 0, seed: int = 0) -> dict:
    """A batch of `count` phantoms of the dataset described by `info` (built like the real split)."""
    argument = f"size={info.size[0]},channels={info.channels},count={max(count + start, 16)}"
    split = registries().datasets.get(f"phantoms{info.spatial_dims}d").build(
        "train", DatasetOptions(argument=argument, seed=seed))
    return split.batch(range(start, start + count))


def tiny_model(tasks: list[PretextTask], datasets: list[DatasetInfo] | None = None, seed: int = 0,
               **overrides) -> MultitaskModel:
    torch.manual_seed(seed)
    datasets = datasets or [phantom_info(2), phantom_info(3)]
    return build_multitask_model("tiny", datasets, tasks, **{**TINY, **overrides})


def check_task_trains(task: PretextTask, spatial_dims: int, latents: int = 8) -> None:
    """Forward and backward of `task` on a phantom batch: finite loss, gradients into the encoder."""
    model = tiny_model([task], latents=latents)
    info = next(i for i in model.dataset_infos if i.spatial_dims == spatial_dims)
    if task not in model.tasks_for(info.name):
        reason = task.reject_reason(info, model.dataset_infos)
        pytest.skip(f"{task.name} does not accept {spatial_dims}D phantoms: {reason}")
    results = model(phantom_batch(info), torch.Generator().manual_seed(0))
    result = results[task.name]
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values())
    result.loss.backward()
    grads = [p.grad for p in model.encoder.body.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("latents", [8, 0])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", registries().tasks.names())
def test_every_registered_task_trains(name, spatial_dims, latents):
    check_task_trains(registries().tasks.get(name), spatial_dims, latents)


def test_every_task_accepts_some_phantoms():
    infos = [phantom_info(2), phantom_info(3)]
    for entry in registries().tasks:
        assert any(entry.obj.reject_reason(info, infos) is None for info in infos), entry.name


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", registries().input_adapters.names())
def test_every_input_adapter_embeds_and_backpropagates(name, channels):
    adapter = registries().input_adapters.get(name)
    for spatial_dims in adapter.spatial_dims:
        size = (PHANTOM_SIZES[spatial_dims],) * spatial_dims
        module = adapter.build(channels=channels, size=size, embed_dim=16, patch=4)
        x = torch.rand(2, channels, *size, requires_grad=True)
        tokens = module(x)
        assert tokens.shape[0] == 2 and tokens.shape[2] == 16 and torch.isfinite(tokens).all()
        tokens.square().mean().backward()
        assert x.grad is not None and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("name", registries().output_heads.names())
def test_every_output_head_maps_features_and_backpropagates(name):
    head = registries().output_heads.get(name)
    module = head.build(embed_dim=16, **head.example_spec)
    features = torch.randn(2, 5, 16, requires_grad=True)
    out = module(features)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert features.grad is not None and all(p.grad is not None for p in module.parameters())


@dataclass(frozen=True)
class DenoiseOptions:
    noise: float = 0.1


class Denoise(PretextTask):
    """A third party's task: reconstruct the clean image from a noisy one."""

    name = "third-party-denoise"
    description = "Denoising (test plugin)"
    spatial_dims = (2,)
    Options = DenoiseOptions

    def output_spec(self, info, run):
        return OutputSpec("dense", queries="patches")

    def make_view(self, ctx, batch, generator):
        image = batch["image"]
        noise = torch.randn(image.shape, generator=generator) * self.options.noise
        return View((image + noise).clamp(0, 1), target=image)

    def loss(self, ctx, prediction, view):
        return TaskResult((ctx.unpatchify(prediction, view.target) - view.target).square().mean())


class ThirdParty:
    @hookimpl
    def register_pretext_tasks(self, register):
        register(Denoise())


@pytest.fixture
def third_party_task():
    pm, _, _ = plugin_manager()
    pm.register(ThirdParty(), name="third-party")
    registries.cache_clear()
    yield registries().tasks.get("third-party-denoise")
    pm.unregister(name="third-party")
    registries.cache_clear()


def test_a_third_party_task_goes_through_the_same_smoke_test(third_party_task):
    assert third_party_task.name in registries().tasks
    check_task_trains(third_party_task, 2)
