"""Target generation checked on hand-made cases: the label is the transformation actually applied."""

import itertools

import numpy as np
import pytest
import torch

from medformer_core.api.data import DatasetInfo
from medformer_core.api.errors import UsageError
from medformer_core.api.plugins import registries
from medformer_core.model.multitask import ModelTaskContext
from medformer_plugins.task_contrastive import nt_xent
from medformer_plugins.task_domain_adversarial import reverse_gradient
from medformer_plugins.task_jigsaw import GRIDS, maximal_hamming_permutations, shuffle_tiles
from medformer_plugins.task_mae import random_masking
from medformer_plugins.task_restoration import (
    RestorationOptions,
    genesis_corrupt,
    local_pixel_shuffle,
    nonlinear_intensity,
    paint,
    random_boxes,
)
from medformer_plugins.task_rotation import CUBE_ROTATIONS, rotate_3d
from medformer_plugins.task_slice_position import take_slices
from medformer_plugins.task_supervised import ordinal_probabilities


@pytest.fixture
def context(tiny_model, phantom_batch):
    """context(task_name, spatial_dims=2, **options): the task, its context in a tiny model, 6 phantoms."""

    def make(task_name: str, spatial_dims: int = 2, **options):
        task = registries().tasks.get(task_name).with_options(**options)
        model = tiny_model([task])
        info = next(i for i in model.dataset_infos if i.spatial_dims == spatial_dims)
        return task, ModelTaskContext(model, task, info), phantom_batch(info, count=6)

    return make


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# rotation


def test_rotation_2d_label_is_the_number_of_quarter_turns(context):
    marker = torch.zeros(1, 1, 6, 6)
    marker[0, 0, 1, 4] = 1.0  # row 1, column 4
    task, ctx, _ = context("rotation")
    view = task.make_view(ctx, {"image": marker.expand(16, -1, -1, -1)}, generator())
    where = {0: (1, 4), 1: (1, 1), 2: (4, 1), 3: (4, 4)}  # counter-clockwise quarter turns
    for image, k in zip(view.image, view.target.tolist()):
        assert image[0, where[k][0], where[k][1]] == 1.0 and image.sum() == 1.0
    assert len(set(view.target.tolist())) > 1


def test_the_24_cube_rotations_are_exactly_the_rotation_group():
    volume = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3, 3)
    ours = [rotate_3d(volume, k) for k in range(len(CUBE_ROTATIONS))]
    assert len(ours) == 24 and torch.equal(ours[0], volume)
    generated, frontier = {volume.numpy().tobytes(): volume}, [volume]
    while frontier:  # close {identity} under quarter turns in the three planes
        current = frontier.pop()
        for plane in [(2, 3), (2, 4), (3, 4)]:
            turned = torch.rot90(current, 1, plane)
            if turned.numpy().tobytes() not in generated:
                generated[turned.numpy().tobytes()] = turned
                frontier.append(turned)
    assert len(generated) == 24
    assert {v.numpy().tobytes() for v in ours} == set(generated)


def test_rotation_3d_view_matches_its_label(context):
    task, ctx, batch = context("rotation", 3)
    view = task.make_view(ctx, batch, generator())
    for image, volume, k in zip(view.image, batch["image"], view.target.tolist()):
        assert torch.equal(image, rotate_3d(volume[None], k)[0])


def test_rotation_refuses_non_square_inputs():
    info = DatasetInfo("wide", 2, 1, (28, 32))
    assert "not square/cubic" in registries().tasks.get("rotation").reject_reason(info, [info])


# jigsaw


def test_jigsaw_permutation_sets_are_fixed_distinct_and_far_apart():
    for tiles, least in [(9, 6), (8, 5)]:
        perms = maximal_hamming_permutations(tiles, 100)
        assert np.array_equal(perms, maximal_hamming_permutations.__wrapped__(tiles, 100))
        assert len({tuple(p) for p in perms}) == 100
        assert all(sorted(p) == list(range(tiles)) for p in perms)
        distances = (perms[:, None] != perms[None]).sum(-1) + np.eye(100, dtype=int) * tiles
        assert distances.min() >= least  # random sets of 100 reach 2 or 3


def test_jigsaw_tile_i_holds_the_original_tile_perm_i():
    image = torch.zeros(1, 1, 10, 10)
    for i, (r, c) in enumerate(itertools.product(range(3), range(3))):
        image[0, 0, 3 * r:3 * r + 3, 3 * c:3 * c + 3] = i
    image[0, 0, 9, :] = image[0, 0, :, 9] = -1  # the remainder beyond 3 x 3 tiles
    perm = torch.tensor([[4, 0, 8, 2, 6, 1, 3, 7, 5]])
    shuffled = shuffle_tiles(image, perm, (3, 3))
    for i, (r, c) in enumerate(itertools.product(range(3), range(3))):
        assert torch.all(shuffled[0, 0, 3 * r:3 * r + 3, 3 * c:3 * c + 3] == perm[0, i])
    assert torch.all(shuffled[0, 0, 9, :] == -1) and torch.all(shuffled[0, 0, :, 9] == -1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_jigsaw_permutations_invert(spatial_dims, context):
    task, ctx, batch = context("jigsaw", spatial_dims)
    view = task.make_view(ctx, batch, generator())
    perms = task.permutation_set(spatial_dims, torch.device("cpu"))[view.target]
    assert torch.equal(view.image, shuffle_tiles(batch["image"], perms, GRIDS[spatial_dims]))
    assert torch.equal(shuffle_tiles(view.image, perms.argsort(dim=1), GRIDS[spatial_dims]), batch["image"])


# mae


@pytest.mark.parametrize("patches, ratio, kept", [(49, 0.75, 12), (343, 0.85, 51), (4, 0.9, 1), (4, 0.01, 3)])
def test_masks_have_the_configured_ratio(patches, ratio, kept):
    keep, masked = random_masking(8, patches, ratio, generator(), torch.device("cpu"))
    assert keep.shape == (8, kept) and masked.shape == (8, patches - kept)
    if 1 < kept < patches - 1:
        assert abs(masked.shape[1] / patches - ratio) <= 1 / patches
    together = torch.cat([keep, masked], dim=1).sort(dim=1).values
    assert torch.equal(together, torch.arange(patches).expand(8, -1))
    assert torch.equal(keep, keep.sort(dim=1).values)
    assert len({tuple(row) for row in keep.tolist()}) > 1


def test_mae_embeds_only_the_visible_patches(monkeypatch, context):
    seen = []
    task, ctx, batch = context("mae", mask_ratio=0.75)
    adapter = ctx.model.encoder.adapter_for(batch["image"])
    original = adapter.forward

    def recording(x, keep=None):
        seen.append(None if keep is None else tuple(keep.shape))
        return original(x, keep)

    monkeypatch.setattr(adapter, "forward", recording)
    task.forward(ctx, batch, generator())
    assert seen == [(6, 2)]  # 12x12 with 4x4 patches: 9 patches, int(9 * 0.25) = 2 visible


def test_mae_loss_counts_only_the_masked_patches(context):
    task, ctx, batch = context("mae", norm_pix_loss=False)
    image = batch["image"]
    keep, masked = random_masking(6, ctx.num_patches(image), 0.75, generator(), image.device)
    patches = ctx.patchify(image)
    exact = torch.gather(patches, 1, masked[..., None].expand(-1, -1, patches.shape[-1]))
    assert task.forward_loss(ctx, image, exact, masked) == 0.0
    assert task.forward_loss(ctx, image, exact + 0.5, masked) == pytest.approx(0.25)


# restoration


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_restoration_transforms_keep_shapes_and_ranges(spatial_dims, phantom_batch, phantom_info):
    x = phantom_batch(phantom_info(spatial_dims), count=6)["image"]
    g = generator()
    transforms = [lambda v: local_pixel_shuffle(v, 1.0, g), lambda v: nonlinear_intensity(v, g),
                  lambda v: paint(v, 0.5, g), lambda v: genesis_corrupt(v, RestorationOptions(), g)]
    for transform in transforms:
        out = transform(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not torch.equal(out, x)
    off = RestorationOptions(local_rate=0, nonlinear_rate=0, paint_rate=0)
    assert torch.equal(genesis_corrupt(x, off, g), x)


def test_local_pixel_shuffle_only_moves_pixels_within_their_block():
    first = torch.rand(2, 1, 16, 16)
    x = torch.cat([first, 1 - first], dim=1)  # channel 1 mirrors channel 0 pixel by pixel
    out = local_pixel_shuffle(x, 1.0, generator())  # blocks of 2x2

    def blocks(v):
        return v.reshape(2, 2, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 2, 4)

    assert torch.equal(blocks(x).sort(dim=-1).values, blocks(out).sort(dim=-1).values)
    assert not torch.equal(out, x)
    assert torch.equal(out[:, 1], 1 - out[:, 0])  # every channel of a block is shuffled alike


def test_nonlinear_intensity_is_a_monotone_curve_through_the_corners():
    ramp = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8).repeat(16, 1, 1, 1)
    out = nonlinear_intensity(ramp, generator()).reshape(16, -1)
    steps = out[:, 1:] - out[:, :-1]
    increasing, decreasing = (steps >= -1e-6).all(dim=1), (steps <= 1e-6).all(dim=1)
    assert torch.all(increasing | decreasing) and increasing.any() and decreasing.any()
    ends = out[:, [0, -1]]
    assert torch.allclose(ends[increasing], torch.tensor([0.0, 1.0]), atol=1e-4)
    assert torch.allclose(ends[decreasing], torch.tensor([1.0, 0.0]), atol=1e-4)


def test_painting_boxes_have_the_documented_sizes():
    x = torch.zeros(32, 1, 21, 21)
    inner = random_boxes(x, 1 / 6, 1 / 3, generator()).flatten(1).sum(1)
    outer = random_boxes(x, 3 / 7, 4 / 7, generator()).flatten(1).sum(1)
    assert inner.min() >= 3 * 3 and inner.max() <= 5 * 7 * 7
    assert outer.min() >= 9 * 9 and outer.max() <= 21 * 21


# slice position


def test_slices_are_taken_along_the_drawn_axis_at_the_drawn_index():
    d, h, w = torch.meshgrid(torch.arange(5), torch.arange(6), torch.arange(7), indexing="ij")
    volume = (d * 100 + h * 10 + w).float()[None, None].repeat(3, 1, 1, 1, 1)
    index = torch.tensor([2, 3, 4])
    assert take_slices(volume, 0, index).shape == (3, 1, 6, 7)
    assert torch.all(take_slices(volume, 0, index)[1] // 100 == 3)
    assert torch.all(take_slices(volume, 1, index)[2] // 10 % 10 == 4)
    assert torch.all(take_slices(volume, 2, index)[0] % 10 == 2)


def test_slice_positions_are_relative_to_the_axis_length():
    task = registries().tasks.get("slice-position")
    volume = torch.zeros(400, 1, 5, 9, 3)
    axis, index, position = task.draw(volume, generator())
    sizes = torch.tensor([5, 9, 3])[axis]
    assert set(axis.tolist()) == {0, 1, 2} and torch.all(index < sizes)
    assert torch.allclose(position, index / (sizes - 1))
    assert position.min() == 0.0 and position.max() == 1.0


# supervised


def test_ordinal_probabilities_are_a_distribution_from_cumulative_logits():
    logits = torch.tensor([[10.0, 10.0, -10.0, -10.0], [-10.0, -10.0, -10.0, -10.0], [1.0, 2.0, 0.0, -1.0]])
    probs = ordinal_probabilities(logits)
    assert probs.shape == (3, 5) and torch.allclose(probs.sum(1), torch.ones(3)) and probs.min() >= 0
    assert probs.argmax(1)[:2].tolist() == [2, 0]


@pytest.mark.parametrize("kind, labels, score_width", [
    ("multi-class", torch.tensor([[0], [2], [1], [2]]), 3),
    ("binary-class", torch.tensor([[0], [1], [1], [0]]), 2),
    ("multi-label, binary-class", torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]]), 3),
    ("ordinal-regression", torch.tensor([[0], [4], [2], [3]]), 5),
])
def test_supervised_handles_every_medmnist_task_type(kind, labels, score_width, tiny_model, phantom_batch,
                                                     phantom_info):
    classes = score_width if kind != "binary-class" else 2
    info = DatasetInfo("labeled", 2, 1, (12, 12), kind, {i: str(i) for i in range(classes)})
    model = tiny_model([registries().tasks.get("supervised")], [info])
    batch = {**phantom_batch(phantom_info(2)), "dataset": "labeled", "label": labels}
    result = model(batch, generator())["supervised"]
    assert torch.isfinite(result.loss) and 0.0 <= result.metrics["accuracy"] <= 1.0
    scores = model.predict(batch)
    assert scores.shape == (4, score_width) and scores.min() >= 0 and scores.max() <= 1
    partly = labels.clone()
    partly[1:] = -1  # unlabeled rows are left out of the loss
    model.eval()  # the intensity statistics stay as the first batch set them
    alone = model({**batch, "image": batch["image"][:1], "label": labels[:1]}, generator())["supervised"]
    assert torch.allclose(model({**batch, "label": partly}, generator())["supervised"].loss, alone.loss)


def test_supervised_refuses_unlabeled_datasets():
    info = DatasetInfo("plain", 2, 1, (12, 12), "none")
    assert "no labels" in registries().tasks.get("supervised").reject_reason(info, [info])


# domain adversarial


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    reversed_ = reverse_gradient(x, 0.5)
    assert torch.equal(reversed_, x)
    reversed_.sum().backward()
    assert torch.equal(x.grad, torch.full((3, 4), -0.5))


def test_the_encoder_receives_the_domain_classifiers_gradient_reversed(context):
    task, ctx, batch = context("domain-adversarial", coefficient=1.0)
    task.forward(ctx, batch, generator()).loss.backward()
    adversarial = ctx.model.encoder.body[0].mlp[0].weight.grad.clone()
    ctx.model.zero_grad()
    logits = ctx.decode(ctx.encode(batch["image"]))
    domain = sorted(i.name for i in ctx.run).index(ctx.info.name)
    torch.nn.functional.cross_entropy(logits, torch.full((6,), domain)).backward()
    assert torch.allclose(adversarial, -ctx.model.encoder.body[0].mlp[0].weight.grad)


# contrastive


def test_nt_xent_rewards_matching_views():
    samples = torch.eye(4, 8)
    result = nt_xent(torch.cat([samples, samples]), temperature=0.2)
    assert result.metrics["accuracy"] == 1.0 and result.loss < 0.1
    assert nt_xent(torch.randn(8, 8, generator=generator()), temperature=0.2).loss > 1.0


def test_contrastive_views_are_two_augmentations_of_each_sample(context):
    task, ctx, batch = context("contrastive", 3)
    view = task.make_view(ctx, batch, generator())
    assert view.image.shape == (12, *batch["image"].shape[1:])
    assert view.image.min() >= 0 and view.image.max() <= 1
    assert not torch.equal(view.image[:6], view.image[6:])
    assert torch.equal(view.image, task.make_view(ctx, batch, generator()).image)  # seeded


def test_contrastive_needs_two_samples(context):
    task, ctx, batch = context("contrastive")
    with pytest.raises(ValueError, match="at least 2"):
        task.make_view(ctx, {**batch, "image": batch["image"][:1]}, generator())


def test_task_option_ranges_are_checked():
    for name, bad in [("contrastive", {"temperature": 0}), ("jigsaw", {"permutations": 1}),
                      ("restoration", {"paint_rate": 2.0}), ("domain-adversarial", {"coefficient": -1}),
                      ("slice-position", {"position_weight": -1})]:
        with pytest.raises(UsageError, match=f"task '{name}'"):
            registries().tasks.get(name).with_options(**bad)
