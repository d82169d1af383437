"""The encoder's pooled features depend on the image from the first step.

Three mechanisms, each checked on its own, then their effect: the between-image share of the
pooled features of an untrained `tiny` encoder (`medformer_core.reporting.signal`), on images that
share most of their content and on the real MedMNIST sets. Before these mechanisms the share was
0.0001 (AdrenalMNIST3D) to 0.014 (OrganAMNIST) on the same batches (benchmarks/results/ablation_model.md,
section 18); every head that reads the pooled feature then sat at chance.
"""

import pytest
import torch

from medformer_core.api.data import DatasetInfo
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.model.blocks import CrossBlock
from medformer_core.model.intensity import IntensityStats
from medformer_core.model.patches import sincos_position_embedding
from medformer_core.reporting.signal import between_image_share, pooled_encoder_features

REAL_SETS = {"retinamnist": 0.3, "bloodmnist": 0.2, "organamnist": 0.3, "adrenalmnist3d": 0.1}


def test_between_image_share_is_zero_for_equal_rows_and_one_for_centred_ones():
    row = torch.randn(1, 16)
    assert between_image_share(row.expand(8, -1)) == 0.0
    spread = torch.randn(8, 16)
    assert between_image_share(spread - spread.mean(dim=0)) == pytest.approx(between_image_share(spread), abs=0.2)
    assert between_image_share(torch.randn(512, 16)) > 0.95


def test_intensity_stats_standardise_each_channel_with_the_first_batches():
    stats = IntensityStats(channels=2, batches=3).train()
    x = torch.stack([0.2 + 0.1 * torch.randn(16, 8, 8), 0.7 + 0.05 * torch.randn(16, 8, 8)], dim=1)  # [B, C, H, W]
    out = stats(x)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(2), atol=0.01)
    for _ in range(5):
        stats(x + 1.0)  # two more batches are folded in, then the statistics are fixed
    assert int(stats.count) == 3
    assert stats.mean[0].item() == pytest.approx(0.2 + 2 / 3, abs=0.01)


def test_intensity_stats_start_from_the_first_batch_in_eval_mode_and_then_stay():
    stats = IntensityStats(channels=1).eval()
    stats(torch.full((2, 1, 4, 4), 0.5))
    stats(torch.full((2, 1, 4, 4), 0.9))
    assert int(stats.count) == 1 and stats.mean.item() == pytest.approx(0.5)


def test_intensity_stats_survive_a_state_dict_round_trip():
    trained = IntensityStats(channels=1).train()
    trained(torch.rand(4, 1, 6, 6, 6))
    fresh = IntensityStats(channels=1).eval()
    fresh.load_state_dict(trained.state_dict())
    x = torch.rand(2, 1, 6, 6, 6)
    assert torch.equal(fresh(x), trained.eval()(x)) and int(fresh.count) == 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_position_embedding_adds_nothing_to_the_mean_token(spatial_dims):
    adapter = registries().input_adapters.get(f"patch{spatial_dims}d").build(
        channels=1, size=(12,) * spatial_dims, embed_dim=32, patch=4)
    grid = (3,) * spatial_dims
    positions = adapter.position_embedding(grid, torch.device("cpu"), torch.float32)
    assert positions.mean(dim=0).abs().max() < 1e-6
    sincos = sincos_position_embedding(grid, 32)
    assert torch.allclose(positions - positions[0], sincos - sincos[0], atol=1e-6)  # the same differences


def test_the_input_read_weighs_tokens_by_their_size():
    torch.manual_seed(0)
    read = CrossBlock(32, 2, 2.0, raw_values=True)
    latents, tokens = torch.randn(1, 4, 32), torch.randn(1, 10, 32)
    louder = tokens.clone()
    louder[:, 0] *= 10  # one token of tissue among quiet background: its value grows, its key does not
    assert not torch.allclose(read(latents, tokens), read(latents, louder), atol=1e-3)
    read.raw_values = False  # the LayerNorm's read: a token's size is normalised away
    assert torch.allclose(read(latents, tokens), read(latents, louder), atol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_an_untrained_encoder_separates_images_that_share_most_of_their_content(spatial_dims, shared_anatomy):
    images = shared_anatomy(spatial_dims, 16, 32)  # one shared ball plus a small cube each
    info = DatasetInfo("shared", spatial_dims, 1, tuple(images.shape[2:]))
    torch.manual_seed(0)
    model = build_model("tiny", [info], [registries().tasks.get("rotation")]).eval()
    share = between_image_share(pooled_encoder_features(model, {"image": images, "dataset": info.name}))
    assert share > 0.1, share


@pytest.mark.parametrize("name", REAL_SETS)
def test_an_untrained_encoder_separates_real_images(name, real_root):
    factory, options = resolve_dataset(name, data_root=str(real_root))
    split = factory.build("train", options)
    batch = {**split.batch(range(64)), "dataset": split.info.name}
    torch.manual_seed(0)
    model = build_model("tiny", [split.info], [registries().tasks.get("rotation")]).eval()
    share = between_image_share(pooled_encoder_features(model, batch))
    assert share > REAL_SETS[name], share
