"""timm-style smoke tests over every registered plugin: each pretext task on 2D and 3D phantoms,
each input adapter, each output head: forward, backward, finite values. A task, adapter or head a
third party registers is picked up the same way (see the throw-away plugin at the end)."""

import math
from dataclasses import dataclass

import pytest
import torch

from medformer_core import hookimpl
from medformer_core.api.interfaces import OutputSpec, PretextTask, TaskResult, View
from medformer_core.api.plugins import plugin_manager, registries
from medformer_core.model.medformer import module_key
from medformer_core.model.multitask import MultitaskModel


def parameters_the_loss_uses(model: MultitaskModel, task: PretextTask, dataset: str,
                             embedded: set[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters of `task`'s loss on `dataset`: its output for the dataset, the input adapters
    it embedded with, the dataset's embedding and the shared encoder (latents, Input Adaptformer,
    body, norm); not the other modalities' adapters or the other datasets' embeddings and outputs."""
    info = next(i for i in model.dataset_infos if i.name == dataset)
    encoder = model.encoder
    used = {f"encoder.{n}": p for n, p in encoder.named_parameters()
            if not n.startswith(("adapters.", "dataset_embed."))}
    used[f"encoder.dataset_embed.{module_key(dataset)}"] = encoder.dataset_embed[module_key(dataset)]
    for key in embedded:
        used |= {f"encoder.adapters.{key}.{n}": p for n, p in encoder.adapters[key].named_parameters()}
    used |= {f"output.{n}": p for n, p in model.output_for(task, info).named_parameters()}
    return used


def check_task_trains(tiny_model, phantom_batch, task: PretextTask, spatial_dims: int, latents: int = 8) -> None:
    """Forward and backward of `task` on a phantom batch: a finite loss, and a finite gradient in
    every parameter the loss uses."""
    model = tiny_model([task], latents=latents)
    info = next(i for i in model.dataset_infos if i.spatial_dims == spatial_dims)
    if task not in model.tasks_for(info.name):
        reason = task.reject_reason(info, model.dataset_infos)
        pytest.skip(f"{task.name} does not accept {spatial_dims}D phantoms: {reason}")
    embedded = set()
    for key, adapter in model.encoder.adapters.items():
        adapter.register_forward_hook(lambda *_, key=key: embedded.add(key))
    results = model(phantom_batch(info), torch.Generator().manual_seed(0))
    result = results[task.name]
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values())
    result.loss.backward()
    assert embedded, f"{task.name} embedded its view through no input adapter"
    used = parameters_the_loss_uses(model, task, info.name, embedded)
    starved = [n for n, p in used.items() if p.grad is None]
    assert not starved, f"{task.name} on {info.name}: no gradient in {starved}"
    non_finite = [n for n, p in used.items() if not torch.isfinite(p.grad).all()]
    assert not non_finite, f"{task.name} on {info.name}: non-finite gradient in {non_finite}"
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.body.parameters())


@pytest.mark.parametrize("latents", [8, 0])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", registries().tasks.names())
def test_every_registered_task_trains(name, spatial_dims, latents, tiny_model, phantom_batch):
    check_task_trains(tiny_model, phantom_batch, registries().tasks.get(name), spatial_dims, latents)


def test_every_task_accepts_some_phantoms(phantom_info):
    infos = [phantom_info(2), phantom_info(3)]
    for entry in registries().tasks:
        assert any(entry.obj.reject_reason(info, infos) is None for info in infos), entry.name


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", registries().input_adapters.names())
def test_every_input_adapter_embeds_and_backpropagates(name, channels, phantom_info):
    adapter = registries().input_adapters.get(name)
    for spatial_dims in adapter.spatial_dims:
        size = phantom_info(spatial_dims).size
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
    out = module(features, **{key: torch.rand(shape) for key, shape in head.example_inputs.items()})
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


def test_a_third_party_task_goes_through_the_same_smoke_test(third_party_task, tiny_model, phantom_batch):
    assert third_party_task.name in registries().tasks
    check_task_trains(tiny_model, phantom_batch, third_party_task, 2)
