"""Phantoms are a simple anatomy with a canonical orientation (so rotation, jigsaw and slice-position
can be learned on them), and the class shape lies inside the body, visible at every size tests use."""

import itertools

import numpy as np
import pytest

from medformer_plugins.phantoms import generate_phantoms


def symmetries(dims: int):
    """The rotations and reflections of a square or cube but the identity: (axis order, flipped axes)."""
    for order in itertools.permutations(range(dims)):
        for flips in itertools.product((False, True), repeat=dims):
            if order != tuple(range(dims)) or any(flips):
                yield order, tuple(axis for axis, flip in enumerate(flips) if flip)


def grown(masks: np.ndarray) -> np.ndarray:
    """masks [N, *S] bool grown by one voxel towards their face neighbours."""
    dims = masks.ndim - 1
    padded = np.pad(masks, [(0, 0)] + [(1, 1)] * dims)
    inner = (slice(None),) + (slice(1, -1),) * dims
    out = masks.copy()
    for axis, shift in itertools.product(range(1, dims + 1), (-1, 1)):
        out |= np.roll(padded, shift, axis)[inner]
    return out


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_mean_phantom_changes_under_every_rotation_and_flip_and_each_sample_sits_nearest_it(spatial_dims):
    mean = generate_phantoms(64, 28, spatial_dims, seed=0)[0][:, 0].mean(0) / 255  # [*S]
    samples = generate_phantoms(64, 28, spatial_dims, seed=1)[0][:, 0] / 255  # not in the mean: [64, *S]
    axes = tuple(range(1, spatial_dims + 1))
    to_mean = np.sqrt(((samples - mean) ** 2).mean(axes))  # [64]
    for order, flips in symmetries(spatial_dims):  # 7 in 2D, 47 in 3D (those that swap D with H or W too)
        moved = np.flip(mean.transpose(order), flips)
        assert np.abs(moved - mean).mean() > 0.025, (order, flips)  # over 6 grey levels per voxel on average
        ratio = to_mean / np.sqrt(((samples - moved) ** 2).mean(axes))  # about 1 for symmetric phantoms
        assert ratio.max() < 0.9 and ratio.mean() < 0.75, (order, flips, ratio.max(), ratio.mean())


@pytest.mark.parametrize("spatial_dims, size", [(2, 28), (3, 28), (2, 8), (3, 8)])  # 8: the smallest tests use
def test_every_shape_is_drawn_inside_the_body_and_stands_out(spatial_dims, size):
    images, labels, masks = generate_phantoms(128, size, spatial_dims, channels=2, seed=3)
    assert set(labels[:, 0].tolist()) == {0, 1, 2, 3}
    body = images > 0  # outside the body the image is 0 (air), inside it never is: [N, C, *S]
    assert (body[:, 0] == body[:, 1]).all()  # both channels see the same anatomy
    shape, body = masks.astype(bool), body[:, 0]
    axes = tuple(range(1, spatial_dims + 1))
    assert shape.any(axes).all() and not (shape & ~body).any()
    for channel, sign in ((0, 1), (1, -1)):  # brighter than the rest of the body; darker where inverted
        x = images[:, channel] / 255
        inside = (x * shape).sum(axes) / shape.sum(axes)
        rest = (x * (body & ~shape)).sum(axes) / (body & ~shape).sum(axes)
        assert (sign * (inside - rest)).min() > 0.2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_at_size_28_every_shape_keeps_a_voxel_of_body_around_it(spatial_dims):
    images, _, masks = generate_phantoms(256, 28, spatial_dims, seed=4)
    shape, body = masks.astype(bool), images[:, 0] > 0
    axes = tuple(range(1, spatial_dims + 1))
    assert not (grown(shape) & ~body).any()
    assert (body & ~shape).sum(axes).min() > 3 * shape.sum(axes).max()  # the body is much larger than any shape


@pytest.mark.parametrize("spatial_dims, voxels", [(2, (5, 9, 4, 3)), (3, (7, 27, 6, 3))])
def test_at_size_8_the_shapes_are_whole_and_tell_the_classes_apart(spatial_dims, voxels):
    """A ball is the centre voxel and its face neighbours, a box their cube, a shell the neighbours
    alone, a rod three voxels in a row: none clipped by the body."""
    _, labels, masks = generate_phantoms(256, 8, spatial_dims, seed=5)
    counts = masks.reshape(len(masks), -1).sum(1)
    for label, expected in enumerate(voxels):
        assert set(counts[labels[:, 0] == label].tolist()) == {expected}
