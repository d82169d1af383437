"""`jigsaw`: solve a shuffled puzzle (Noroozi and Favaro, 2016): 3x3 tiles in 2D, 2x2x2 in 3D.

The image is cut into a grid of equal tiles (size // grid per axis; the remainder at the end of an
axis stays in place), the tiles are shuffled by one permutation from a fixed set, and the model
classifies which permutation it was. The set is chosen once, deterministically (seed 0), greedily
for maximal Hamming distance: each next permutation is the one farthest (in the minimum Hamming
distance) from those already chosen, ties broken by the seeded generator.

Convention: after shuffling with `perm`, tile position i holds the original tile perm[i].
"""

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from medformer_core import OutputSpec, PretextTask, View, classification_chance, classification_result, hookimpl
from medformer_core.api.draws import integers
from medformer_core.model.patches import map_tiles

GRIDS = {2: (3, 3), 3: (2, 2, 2)}
PERMUTATION_SEED = 0


@dataclass(frozen=True)
class JigsawOptions:
    permutations: int = 100
    batch_norm: bool = True  # a batch norm in the label head (plugins/heads.py); each sample draws its permutation

    def __post_init__(self):
        if not 2 <= self.permutations <= 1000:
            raise ValueError(f"permutations must be in [2, 1000], got {self.permutations}")


@functools.cache
def maximal_hamming_permutations(tiles: int, count: int, seed: int = PERMUTATION_SEED) -> np.ndarray:
    """`count` permutations of range(tiles), greedily spread by Hamming distance: [count, tiles]."""
    every = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)
    if count > len(every):
        raise ValueError(f"{tiles} tiles have only {len(every)} permutations, {count} were asked")
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(every)))]
    nearest = (every != every[chosen[0]]).sum(axis=1)
    for _ in range(count - 1):
        farthest = np.flatnonzero(nearest == nearest.max())
        pick = int(farthest[rng.integers(len(farthest))])
        chosen.append(pick)
        nearest = np.minimum(nearest, (every != every[pick]).sum(axis=1))
    return every[chosen].astype(np.int64)


def shuffle_tiles(x: torch.Tensor, perms: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """x [B, C, *S], perms [B, T] (T = prod(grid)) -> x with its tiles rearranged per sample."""
    tile = tuple(s // g for s, g in zip(x.shape[2:], grid))
    return map_tiles(x, tile, lambda tiles: torch.gather(tiles, 1, perms[..., None].expand(-1, -1, tiles.shape[-1])))


class Jigsaw(PretextTask):
    name = "jigsaw"
    description = "Classify which of a fixed set of permutations shuffled 3x3 (2D) or 2x2x2 (3D) tiles"
    spatial_dims = (2, 3)
    Options = JigsawOptions

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        grid = GRIDS.get(info.spatial_dims)
        if reason is None and any(s < g for s, g in zip(info.size, grid)):
            return f"size {'x'.join(map(str, info.size))} is smaller than the {'x'.join(map(str, grid))} puzzle"
        return reason

    def permutation_set(self, spatial_dims: int, device: torch.device) -> torch.Tensor:
        """[permutations, tiles] int64, the classes of the puzzle for 2D or 3D."""
        tiles = math.prod(GRIDS[spatial_dims])
        return torch.from_numpy(maximal_hamming_permutations(tiles, self.options.permutations)).to(device)

    def output_spec(self, info, run):
        options = {"num_outputs": self.options.permutations, "batch_norm": self.options.batch_norm}
        return OutputSpec("label", queries=1, options=options)

    def chance(self, data, batch_size):
        return classification_chance(self.options.permutations)

    def make_view(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        dims = image.ndim - 2
        classes = integers(self.options.permutations, (image.shape[0],), generator, image.device)
        perms = self.permutation_set(dims, image.device)[classes]  # [B, T]
        return View(shuffle_tiles(image, perms, GRIDS[dims]), target=classes)

    def loss(self, ctx, prediction, view):
        return classification_result(prediction, view.target)


@hookimpl
def register_pretext_tasks(register):
    register(Jigsaw())
