"""`rotation`: predict which rotation was applied (Gidaris et al., 2018), in 2D and 3D.

Classes:
- 2D: 4, class k = k quarter turns counter-clockwise in the (H, W) plane (torch.rot90(x, k, (-2, -1))).
- 3D: the 24 rotations of a cube (the proper rotations among axis permutations with flips), listed
  by `CUBE_ROTATIONS` as (axis permutation, flipped axes) in a fixed order; class 0 is the identity.
  A volume's (D, H, W) axes are permuted as `perm`, then the axes in `flips` are reversed.

Rotations keep the shape only for square images and cubic volumes, so the task accepts only those.
"""

import itertools
from dataclasses import dataclass

import torch

from medformer_core import OutputSpec, PretextTask, View, classification_chance, classification_result, hookimpl
from medformer_core.api.draws import integers


def _is_proper(perm: tuple[int, ...], signs: tuple[int, ...]) -> bool:
    """True when the signed permutation matrix has determinant +1 (a rotation, no reflection)."""
    inversions = sum(1 for i, j in itertools.combinations(range(3), 2) if perm[i] > perm[j])
    return (-1) ** inversions * signs[0] * signs[1] * signs[2] == 1


CUBE_ROTATIONS: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    (perm, tuple(axis for axis in range(3) if signs[axis] < 0))
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
    if _is_proper(perm, signs)
]


def rotate_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [B, C, H, W] -> turned k quarter turns counter-clockwise."""
    return torch.rot90(x, k, dims=(-2, -1))


def rotate_3d(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [B, C, D, H, W] -> rotated by CUBE_ROTATIONS[k]."""
    perm, flips = CUBE_ROTATIONS[k]
    x = x.permute(0, 1, *(2 + p for p in perm))
    return x.flip([2 + a for a in flips]) if flips else x


def rotate(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """x: [B, C, *S] (square or cubic), classes: [B] -> each sample rotated by its class."""
    turn = rotate_2d if x.ndim == 4 else rotate_3d
    out = torch.empty_like(x)
    for k in classes.unique().tolist():
        rows = (classes == k).nonzero().squeeze(1)
        out[rows] = turn(x[rows], k)
    return out


@dataclass(frozen=True)
class RotationOptions:
    batch_norm: bool = True  # a batch norm in the label head (plugins/heads.py); each sample draws its rotation


class Rotation(PretextTask):
    name = "rotation"
    description = "Predict the rotation applied: 4 quarter turns in 2D, the 24 cube rotations in 3D"
    spatial_dims = (2, 3)
    Options = RotationOptions

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        if reason is None and len(set(info.size)) != 1:
            shape = "x".join(map(str, info.size))
            return f"{shape} is not square/cubic, and rotations must keep the shape"
        return reason

    @staticmethod
    def num_classes(spatial_dims: int) -> int:
        return 4 if spatial_dims == 2 else len(CUBE_ROTATIONS)

    def output_spec(self, info, run):
        options = {"num_outputs": self.num_classes(info.spatial_dims), "batch_norm": self.options.batch_norm}
        return OutputSpec("label", queries=1, options=options)

    def chance(self, data, batch_size):
        return classification_chance(self.num_classes(data.info.spatial_dims))

    def make_view(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        classes = integers(self.num_classes(image.ndim - 2), (image.shape[0],), generator, image.device)
        return View(rotate(image, classes), target=classes)

    def loss(self, ctx, prediction, view):
        return classification_result(prediction, view.target)  # prediction [B, classes]


@hookimpl
def register_pretext_tasks(register):
    register(Rotation())
