"""The convolutional stems `conv2d`/`conv3d` and the pooled start of the latents: shapes on awkward
sizes and patches, no masked content reaching a visible token (MAE), and the latent regions."""

import pytest
import torch

from medformer_core.api.interfaces import InputSpec
from medformer_core.api.plugins import registries
from medformer_core.model.medformer import Medformer, ModelConfig, latent_grid, latent_regions, region_means
from medformer_plugins.conv_adapters import masked_group_norm, stem_strides, upsample, visible_patches


def stem(spatial_dims: int, channels: int = 1, patch: int = 4, embed_dim: int = 16):
    torch.manual_seed(0)
    adapter = registries().input_adapters.get(f"conv{spatial_dims}d")
    return adapter.build(channels=channels, size=(patch,) * spatial_dims, embed_dim=embed_dim, patch=patch)


def test_the_stem_strides_multiply_to_the_patch():
    assert stem_strides(4) == [2, 2]
    assert stem_strides(16) == [2, 2, 2, 2]
    assert stem_strides(6) == [2, 3]
    assert stem_strides(5) == [5]
    assert stem_strides(1) == []


@pytest.mark.parametrize("spatial_dims, size, channels, patch", [
    (2, (28, 28), 3, 4), (2, (30, 17), 1, 4), (2, (12, 12), 5, 6), (3, (28, 28, 28), 1, 4),
    (3, (9, 7, 8), 2, 3), (3, (16, 16, 16), 1, 8),
])
def test_the_stem_embeds_onto_the_patch_grid(spatial_dims, size, channels, patch):
    module = stem(spatial_dims, channels, patch)
    x = torch.rand(2, channels, *size, requires_grad=True)
    tokens = module(x)
    grid = [-(-s // patch) for s in size]
    assert tokens.shape == (2, torch.Size(grid).numel(), 16)
    tokens.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masked_pixels_never_reach_a_visible_token(spatial_dims):
    module = stem(spatial_dims).eval()
    size = (16,) * spatial_dims
    n = 4 ** spatial_dims
    keep = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[: n // 4] for i in range(2)])
    x = torch.rand(2, 1, *size)
    hidden = torch.ones(2, n)
    hidden.scatter_(1, keep, 0.0)
    pixels = upsample(visible_patches(keep, (4,) * spatial_dims), x)
    assert pixels.sum() == x[0].numel() // 4 * 2  # a quarter of each image stays
    changed = x + torch.rand_like(x) * (1 - pixels)  # new content only where patches are hidden
    assert torch.equal(module(x, keep), module(changed, keep))
    visible_change = x + pixels * 0.5
    assert not torch.allclose(module(x, keep), module(visible_change, keep))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_keeping_every_patch_gives_the_tokens_of_the_whole_image(spatial_dims):
    module = stem(spatial_dims)
    x = torch.rand(2, 1, *(16,) * spatial_dims)
    keep = torch.arange(4 ** spatial_dims).repeat(2, 1)
    assert torch.allclose(module(x, keep), module(x), atol=1e-5)


def test_masked_group_norm_takes_its_statistics_over_the_visible_positions():
    norm = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 4, 6, 5)
    assert torch.allclose(masked_group_norm(norm, x, torch.ones(3, 1, 6, 5)), norm(x), atol=1e-5)
    mask = torch.zeros(3, 1, 6, 5)
    mask[..., :3, :] = 1.0
    visible = masked_group_norm(norm, x * 7.0 * (1 - mask) + x * mask, mask)[..., :3, :]
    assert torch.allclose(visible, masked_group_norm(norm, x, mask)[..., :3, :], atol=1e-5)
    assert torch.allclose(visible, norm(x[..., :3, :]), atol=1e-5)
    half = masked_group_norm(norm, x.bfloat16(), torch.ones(3, 1, 6, 5, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), norm(x), atol=0.1)


def test_the_visible_mask_follows_the_kept_patches():
    visible = visible_patches(torch.tensor([[0, 3]]), (2, 2))
    assert visible.tolist() == [[[[1.0, 0.0], [0.0, 1.0]]]]
    assert upsample(visible, torch.zeros(1, 5, 4, 6)).shape == (1, 1, 4, 6)
    assert upsample(visible, torch.zeros(1, 5, 4, 6))[0, 0, :, :3].tolist() == [[1.0] * 3] * 2 + [[0.0] * 3] * 2


def test_latent_grids_split_the_latents_evenly():
    assert latent_grid(32, 2) == (4, 8)
    assert latent_grid(64, 3) == (4, 4, 4)
    assert latent_grid(32, 3) == (2, 4, 4)
    assert latent_grid(7, 2) == (1, 7)


def test_latent_regions_tile_the_grid_in_contiguous_blocks():
    regions = latent_regions((8, 8), 16).reshape(8, 8)  # a 4x4 latent grid: 2x2 blocks of tokens
    assert torch.equal(regions[:2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(regions[6:, 6:], torch.full((2, 2), 15))
    assert torch.bincount(regions.flatten()).tolist() == [4] * 16
    regions = latent_regions((7, 7, 7), 32)
    assert regions.shape == (343,) and regions.min() == 0 and regions.max() == 31
    assert latent_regions((3, 3), 32).max() < 32  # fewer tokens than latents: some regions stay empty


def test_region_means_average_each_region_and_leave_empty_ones_at_zero():
    tokens = torch.tensor([[[1.0], [3.0], [10.0]]])
    regions = torch.tensor([[0, 0, 2]])
    assert region_means(tokens, regions, 4).flatten().tolist() == [2.0, 0.0, 10.0, 0.0]


def test_each_latent_starts_from_its_own_region_of_the_image():
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=32, depth=1, heads=2, latents=4, adapter2d="patch2d", latent_pool=True)
    model = Medformer(config, [InputSpec(2, 1, (16, 16))], ["data"], registries().input_adapters).eval()
    x = torch.rand(1, 1, 16, 16)
    tokens = model.embed(x, "data")
    start = {}

    def record(module, args):
        start["latents"] = args[0]

    model.input_adaptformer.register_forward_pre_hook(record)
    model(x, "data")
    regions = latent_regions((4, 4), 4)
    expected = model.latents + torch.stack([tokens[0, regions == r].mean(0) for r in range(4)])
    assert torch.allclose(start["latents"][0], expected, atol=1e-6)
    keep = torch.tensor([[0, 1, 2]])  # three patches of the first row: regions 0, 0 and 1
    model(x, "data", keep)
    kept = tokens[0, :3]
    expected = model.latents + torch.stack([kept[:2].mean(0), kept[2], torch.zeros(32), torch.zeros(32)])
    assert torch.allclose(start["latents"][0], expected, atol=1e-6)
