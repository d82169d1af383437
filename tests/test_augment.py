"""Augment: shapes, exactness of flips/rotations, per-sample randomness, determinism, each op's effect."""

import pytest
import torch

from medformer_core.engine.augment import Augment

OFF = dict(flip_prob=0.0, rot90=False, crop_scale=None, intensity=0.0, noise_std=0.0, blur_prob=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 3, 28, 28), (3, 1, 16, 24), (4, 2, 12, 12, 12), (2, 1, 6, 8, 10)])
def test_shape_and_range_kept(shape):
    x = torch.rand(shape)
    y = Augment(len(shape) - 2, blur_prob=1.0, noise_std=0.2, intensity=0.5)(x, gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(y, x)


def test_all_off_is_identity():
    x = torch.rand(3, 1, 8, 8, 8)
    assert torch.equal(Augment(3, **OFF)(x, gen()), x)


@pytest.mark.parametrize("dims", [2, 3])
def test_deterministic_given_generator(dims):
    x = torch.rand((6, 2) + (10,) * dims)
    a = Augment(dims, blur_prob=0.5)
    assert torch.equal(a(x, gen(7)), a(x, gen(7)))
    assert not torch.equal(a(x, gen(7)), a(x, gen(8)))


def test_parameters_differ_per_sample():
    x = torch.rand(1, 1, 8, 8).repeat(16, 1, 1, 1)  # 16 identical samples
    y = Augment(2, **{**OFF, "flip_prob": 0.5, "rot90": True})(x, gen())
    distinct = {tuple(y[i].flatten().tolist()) for i in range(16)}
    assert len(distinct) > 3


def test_flips_are_exact():
    x = torch.rand(4, 2, 5, 7)
    y = Augment(2, **{**OFF, "flip_prob": 1.0})(x, gen())
    torch.testing.assert_close(y, x.flip(2).flip(3), atol=1e-6, rtol=0)


def test_rot90_is_an_exact_rotation_in_a_square_plane():
    x = torch.rand(32, 1, 4, 4, 4)
    y = Augment(3, **{**OFF, "rot90": True})(x, gen())
    planes = [(2, 3), (2, 4), (3, 4)]
    turns_seen = set()
    for i in range(32):
        matches = [(k, p) for k in range(4) for p in planes
                   if torch.allclose(y[i], x[i].rot90(k, (p[0] - 1, p[1] - 1)), atol=1e-6)]
        assert matches, f"sample {i} is not a 90-degree rotation of its input"
        turns_seen.add(matches[0][0])
    assert len(turns_seen) > 1


def test_rot90_only_turns_planes_where_the_shape_allows():
    x = torch.rand(16, 1, 12, 8, 8)  # only the H-W plane is square
    y = Augment(3, **{**OFF, "rot90": True})(x, gen())
    for i in range(16):
        assert any(torch.allclose(y[i], x[i].rot90(k, (2, 3)), atol=1e-6) for k in range(4))
    flat = torch.rand(4, 1, 6, 9)  # no square plane: rotation is skipped, nothing else changes
    assert torch.equal(Augment(2, **{**OFF, "rot90": True})(flat, gen()), flat)


def test_crop_zooms_in():
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None, None].repeat(8, 1, 1, 1)  # [8, 1, 32, 32]
    y = Augment(2, **{**OFF, "crop_scale": (0.25, 0.25)})(ramp, gen())
    spans = y[:, 0, 0, -1] - y[:, 0, 0, 0]
    assert torch.allclose(spans, torch.full((8,), 0.5), atol=0.05)  # half the side: half the ramp


def test_intensity_noise_and_blur_do_their_job():
    flat = torch.full((8, 1, 16, 16, 16), 0.5)
    jittered = Augment(3, **{**OFF, "intensity": 0.3})(flat, gen())
    assert jittered.mean(dim=(1, 2, 3, 4)).std() > 0.01  # brightness differs between samples
    noisy = Augment(3, **{**OFF, "noise_std": 0.1})(flat, gen())
    assert 0.0 < noisy.std() < 0.1
    rough = torch.rand(8, 1, 16, 16, 16)
    blurred = Augment(3, **{**OFF, "blur_prob": 1.0, "blur_sigma": (1.0, 1.0)})(rough, gen())
    assert blurred.std() < 0.5 * rough.std()
    torch.testing.assert_close(blurred.mean(), rough.mean(), atol=0.01, rtol=0)


def test_blur_touches_only_chosen_samples():
    rough = torch.rand(32, 1, 12, 12)
    y = Augment(2, **{**OFF, "blur_prob": 0.5})(rough, gen())
    same = [torch.equal(y[i], rough[i]) for i in range(32)]
    assert 0 < sum(same) < 32


@pytest.mark.parametrize("bad", [
    dict(spatial_dims=4), dict(spatial_dims=2, flip_prob=1.5), dict(spatial_dims=2, crop_scale=(0.8, 0.5)),
    dict(spatial_dims=2, crop_scale=(0.0, 1.0)), dict(spatial_dims=2, noise_std=-1.0),
    dict(spatial_dims=2, blur_sigma=(2.0, 1.0)),
])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError):
        Augment(**bad)


def test_wrong_input_rank_is_rejected():
    with pytest.raises(ValueError, match="spatial dims"):
        Augment(3)(torch.rand(2, 1, 8, 8), gen())
