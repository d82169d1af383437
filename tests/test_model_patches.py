"""Patch geometry: padding, (un)patchify round trips, the sin-cos grid embedding."""

import pytest
import torch

from medformer_core.model.patches import grid_shape, pad_to_multiple, patchify, sincos_position_embedding, unpatchify


@pytest.mark.parametrize("size, patch", [((8, 12), (4, 4)), ((6, 7, 9), (2, 2, 2)), ((30, 30), (4, 4))])
def test_patchify_round_trips_and_pads_at_the_end(size, patch):
    x = torch.rand(2, 3, *size)
    patches = patchify(x, patch)
    grid = grid_shape(size, patch)
    assert patches.shape == (2, torch.tensor(grid).prod().item(), 3 * torch.tensor(patch).prod().item())
    assert torch.equal(unpatchify(patches, patch, 3, size), x)
    padded = pad_to_multiple(x, patch)
    assert padded.shape[2:] == tuple(g * p for g, p in zip(grid, patch))
    inside = (...,) + tuple(slice(0, s) for s in size)
    assert torch.equal(padded[inside], x)
    padded[inside] = 0
    assert torch.all(padded == 0)  # the padding is zeros


def test_patch_order_is_row_major_like_a_conv_output():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    weight = torch.zeros(1, 2, 2, 2)
    weight[0, 1, 1, 0] = 1.0  # picks channel 1, row 1, column 0 of each patch
    conv = torch.nn.functional.conv2d(x, weight, stride=2).flatten(1)  # [1, N]
    patches = patchify(x, (2, 2))
    assert torch.equal(patches @ weight.reshape(1, -1).t(), conv[..., None])


def test_sincos_embedding_distinguishes_every_position():
    for grid in [(7, 7), (4, 5, 6)]:
        pos = sincos_position_embedding(grid, 48)
        assert pos.shape == (torch.tensor(grid).prod().item(), 48)
        assert torch.cdist(pos, pos).add(torch.eye(len(pos)) * 10).min() > 1e-3
        assert pos.abs().max() <= 1.0


def test_sincos_embedding_pads_widths_that_do_not_split_evenly():
    pos = sincos_position_embedding((3, 3, 3), 32)  # 3 axes x 10 channels, 2 left over as zeros
    assert pos.shape == (27, 32) and torch.all(pos[:, 30:] == 0)
