"""The Medformer encoder: shapes for every adapter, size and channel count, `keep`, `latents=0`,
clear shape errors, the kernels' dispatch, gradients, determinism and presets."""

import pytest
import torch

import medformer_kernels
from medformer_core.api.errors import UnknownNameError, UsageError
from medformer_core.api.interfaces import InputAdapter, InputSpec
from medformer_core.api.plugins import registries
from medformer_core.api.registry import Provider, Registry
from medformer_core.model.medformer import PRESETS, Medformer, ModelConfig, model_config
from medformer_core.model.multitask import count_parameters

PATCH_ADAPTERS = {"adapter2d": "patch2d", "adapter3d": "patch3d"}  # the conv stems: test_conv_adapters.py
CASES = [("patch2d", size, c) for size in (28, 64, 128, 224) for c in (1, 3)] + \
        [("patch3d", size, c) for size in (28, 64) for c in (1, 2)]


def encoder(spatial_dims=2, channels=1, size=16, latents=8, **overrides) -> Medformer:
    torch.manual_seed(0)
    options = {"embed_dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, **PATCH_ADAPTERS, **overrides}
    config = ModelConfig(latents=latents, **options)
    inputs = [InputSpec(spatial_dims, channels, (size,) * spatial_dims)]
    return Medformer(config, inputs, ["data"], registries().input_adapters)


@pytest.mark.parametrize("adapter, size, channels", CASES)
def test_every_adapter_size_and_channel_count_gives_the_right_shapes(adapter, size, channels):
    dims = 2 if adapter == "patch2d" else 3
    patch = 4 if size <= 64 else 16
    module = registries().input_adapters.get(adapter).build(channels=channels, size=(size,) * dims,
                                                            embed_dim=32, patch=patch)
    x = torch.rand(2, channels, *(size,) * dims)
    assert module(x).shape == (2, (size // patch) ** dims, 32)
    model = encoder(dims, channels, size, latents=8, patch2d=patch, patch3d=patch)
    assert model(x, "data").shape == (2, 8, 32)


def test_sizes_the_patch_does_not_divide_are_padded():
    model = encoder(2, 1, 30, latents=0)
    assert model(torch.rand(2, 1, 30, 30), "data").shape == (2, 64, 32)  # 30 -> 32: an 8x8 grid
    assert model(torch.rand(1, 1, 30, 17), "data").shape == (1, 8 * 5, 32)


def test_one_adapter_embeds_any_size_of_its_modality():
    model = encoder(3, 1, 8, latents=0)
    assert model(torch.rand(1, 1, 8, 8, 8), "data").shape == (1, 8, 32)
    assert model(torch.rand(1, 1, 12, 8, 16), "data").shape == (1, 3 * 2 * 4, 32)


def test_keep_embeds_only_the_visible_patches():
    model = encoder(2, 1, 16, latents=0)
    x = torch.rand(2, 1, 16, 16)
    keep = torch.tensor([[0, 3, 7], [1, 2, 15]])
    tokens = model.embed(x, "data")
    kept = model.embed(x, "data", keep)
    assert kept.shape == (2, 3, 32)
    assert torch.allclose(kept, torch.gather(tokens, 1, keep[..., None].expand(-1, -1, 32)), atol=1e-6)


def test_latents_zero_is_a_plain_vit_over_the_tokens():
    model = encoder(2, 1, 16, latents=0)
    assert model.latents is None and model.input_adaptformer is None
    assert model(torch.rand(2, 1, 16, 16), "data").shape == (2, 16, 32)


def test_the_encoder_builds_its_adapters_from_the_registry_it_is_given():
    adapters = Registry("input-adapter", InputAdapter)
    adapters.add(registries().input_adapters.get("patch2d"), Provider("test", "tests", "-"))
    config = ModelConfig(embed_dim=32, depth=1, heads=2, latents=4, **PATCH_ADAPTERS)
    model = Medformer(config, [InputSpec(2, 1, (8, 8))], ["data"], adapters)
    assert list(model.adapters) == ["patch2d_1ch"]
    with pytest.raises(UnknownNameError, match="unknown input-adapter 'patch3d'"):
        Medformer(config, [InputSpec(3, 1, (8, 8, 8))], ["data"], adapters)


def test_the_dataset_embedding_tells_datasets_apart():
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=32, depth=1, heads=2, latents=4)
    model = Medformer(config, [InputSpec(2, 1, (8, 8))], ["ct", "mr"], registries().input_adapters)
    with torch.no_grad():
        model.dataset_embed["mr"].fill_(1.0)
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(model.embed(x, "ct") + 1.0, model.embed(x, "mr"))
    with pytest.raises(UsageError, match="no embedding for dataset 'pet'"):
        model(x, "pet")


@pytest.mark.parametrize("bad, expected", [
    (torch.rand(2, 1, 8, 8, 8), r"\[B, 1, H, W\]"),  # wrong number of dims
    (torch.rand(2, 3, 16, 16), r"\[B, 1, H, W\]"),  # channels the adapter was not built for
    (torch.rand(2, 1, 16, 3), r">= 4"),  # smaller than a patch
])
def test_bad_shapes_name_the_expected_shape(bad, expected):
    module = registries().input_adapters.get("patch2d").build(channels=1, size=(16, 16), embed_dim=32, patch=4)
    with pytest.raises(UsageError, match=expected) as error:
        module(bad)
    assert str(list(bad.shape)) in str(error.value)


def test_the_encoder_names_the_modalities_it_was_built_for():
    model = encoder(2, 1, 16)
    with pytest.raises(UsageError, match=r"no input adapter for 3D inputs with 1 channels.*patch2d_1ch \(2D, 1"):
        model(torch.rand(1, 1, 8, 8, 8), "data")
    with pytest.raises(UsageError, match="2D .* or 3D"):
        model(torch.rand(1, 1, 8), "data")


def test_attention_and_patch_embedding_go_through_the_kernels_dispatch(monkeypatch):
    calls = {"attention": 0, "patch_embed": 0}
    for name in calls:
        original = getattr(medformer_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(medformer_kernels, name, counted)
    model = encoder(3, 1, 8, latents=4, depth=3)
    model(torch.rand(1, 1, 8, 8, 8), "data")
    assert calls == {"attention": 1 + 3, "patch_embed": 1}  # Input Adaptformer + 3 body blocks


def test_gradients_reach_every_trainable_parameter(tiny_model, phantom_batch):
    tasks = [entry.obj for entry in registries().tasks]
    model = tiny_model(tasks)
    generator = torch.Generator().manual_seed(0)
    for info in model.dataset_infos:
        results = model(phantom_batch(info), generator)
        sum(r.loss for r in results.values()).backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert starved == []


def test_same_seed_same_model_and_same_losses(tiny_model, phantom_info, phantom_batch):
    def run(seed):
        model = tiny_model([registries().tasks.get("mae"), registries().tasks.get("rotation")])
        batch = phantom_batch(phantom_info(2))
        results = model(batch, torch.Generator().manual_seed(seed))
        return {k: r.loss.item() for k, r in results.items()}, model.state_dict()

    (first, weights), (again, weights_again), (other, _) = run(1), run(1), run(2)
    assert first == again
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert first != other  # another generator seed draws other masks and rotations


def test_stochastic_depth_is_off_in_eval():
    model = encoder(2, 1, 16, depth=4, drop_path=0.5)
    x = torch.rand(4, 1, 16, 16)
    model.train()
    assert not torch.equal(model(x, "data"), model(x, "data"))
    model.eval()
    assert torch.equal(model(x, "data"), model(x, "data"))


def test_presets_build_with_growing_parameter_counts():
    counts = []
    for name in ("tiny", "small", "base"):
        with torch.device("meta"):
            model = Medformer(PRESETS[name], [InputSpec(2, 1, (28, 28)), InputSpec(3, 1, (28, 28, 28))], ["a", "b"],
                              registries().input_adapters)
        counts.append(count_parameters(model))
    assert counts == sorted(counts) and counts[0] > 1_000_000


def test_model_options_are_checked_by_name():
    assert model_config("tiny", latents=0).latents == 0
    with pytest.raises(UsageError, match="unknown model preset 'huge'"):
        model_config("huge")
    with pytest.raises(UsageError, match="did you mean 'latents'"):
        model_config("tiny", latent=4)
    with pytest.raises(UsageError, match="not divisible"):
        model_config("tiny", heads=5)
