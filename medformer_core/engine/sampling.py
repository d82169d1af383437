"""Multi-dataset sampling: every step draws one dataset, then one batch of that dataset's indices.

Convention: dataset i (with n_i training samples) is drawn with probability

    p_i = n_i ** (1 / T) / sum_j n_j ** (1 / T)

so T = 1 samples in proportion to size (every sample equally often), T -> infinity samples datasets
uniformly, and T < 1 favours the large ones further. The draw depends only on (seed, step), so every
DDP rank picks the same dataset at the same step (the same adapters and tasks run everywhere);
each rank then reads its own shard of that dataset's epoch-wise permutation.
"""

import zlib
from collections.abc import Mapping

import numpy as np

from medformer_core.api.data import ImageSplit
from medformer_core.api.errors import UsageError


class MultiDatasetSampler:
    """An endless iterator of `(dataset name, indices [batch_size] int64)`, seeded and resumable.

    splits:     {name: ImageSplit or its number of samples}, in the run's order
    batch_size: samples per batch on this rank
    rank, world_size: this process's shard (DDP); each rank sees a disjoint part of each epoch
    drop_last:  True: every batch is full and an epoch's remainder is skipped; False: every sample
                is seen once per epoch, in ceil(n / batch_size) batches whose sizes differ by at most
                one (no small tail batch; shards are padded by wrapping, as DistributedSampler)
    """

    def __init__(self, splits: Mapping[str, ImageSplit | int], batch_size: int, temperature: float = 1.0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.sizes = {name: (s if isinstance(s, int) else len(s)) for name, s in splits.items()}
        if not self.sizes:
            raise UsageError("no dataset to sample from")
        if batch_size < 1 or temperature <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, temperature > 0, 0 <= rank < world_size; got "
                             f"{batch_size}, {temperature}, {rank}, {world_size}")
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        for name, n in self.sizes.items():
            if self._shard_length(n) < (batch_size if drop_last else 1):
                raise UsageError(
                    f"dataset '{name}' has {n} samples, {self._shard_length(n)} per rank: "
                    f"fewer than the batch size {batch_size}",
                    hint="lower the batch size, or use a larger dataset",
                )
        self.names = list(self.sizes)
        weights = np.array([self.sizes[n] for n in self.names], dtype=np.float64) ** (1.0 / temperature)
        self.probabilities = dict(zip(self.names, weights / weights.sum()))
        self._cumulative = np.cumsum(weights / weights.sum())
        self.step = 0
        self._cursor = {name: (0, 0) for name in self.names}  # name -> (epoch, next batch number)
        self._shards: dict[str, tuple[int, np.ndarray]] = {}  # name -> (epoch, this rank's shard)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, np.ndarray]:
        name = self._choose(self.step)
        epoch, number = self._cursor[name]
        batches = self.batches_per_epoch(name)
        if number >= batches:
            epoch, number = epoch + 1, 0
        indices = self._batch(self._shard(name, epoch), number, batches)
        self._cursor[name] = (epoch, number + 1)
        self.step += 1
        return name, indices

    def batches_per_epoch(self, name: str) -> int:
        """Batches this rank draws from `name` before its permutation is renewed."""
        length = self._shard_length(self.sizes[name])
        return length // self.batch_size if self.drop_last else -(-length // self.batch_size)

    def steps_per_epoch(self) -> int:
        """Steps for one pass over every dataset's shard (the sum of their batches per epoch)."""
        return sum(self.batches_per_epoch(name) for name in self.names)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this sampler stands (checkpoint it).

        The state is the same on every rank, so rank 0's copy resumes all of them."""
        return {"step": self.step, "cursor": {n: list(c) for n, c in self._cursor.items()},
                "sizes": dict(self.sizes), "seed": self.seed, "batch_size": self.batch_size,
                "temperature": self.temperature, "world_size": self.world_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the run's datasets, sizes and sampling settings must match."""
        for key in ("sizes", "seed", "batch_size", "temperature", "world_size", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise UsageError(
                    f"cannot resume the dataset sampler: its {key} was {state.get(key)!r}, "
                    f"this run has {getattr(self, key)!r}",
                    hint="resume with the same datasets, batch size, temperature, seed and number of processes",
                )
        self.step = int(state["step"])
        self._cursor = {n: (int(e), int(b)) for n, (e, b) in state["cursor"].items()}

    def _choose(self, step: int) -> str:
        u = np.random.default_rng([self.seed, step]).random()
        return self.names[min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.names) - 1)]

    def _shard_length(self, n: int) -> int:
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def _batch(self, shard: np.ndarray, number: int, batches: int) -> np.ndarray:
        """Batch `number` of `batches` over `shard`: full batches, or with drop_last=False an even split."""
        if self.drop_last:
            return shard[number * self.batch_size:(number + 1) * self.batch_size]
        return shard[number * len(shard) // batches:(number + 1) * len(shard) // batches]

    def _shard(self, name: str, epoch: int) -> np.ndarray:
        """This rank's part of `name`'s permutation for `epoch` (cached for the current epoch)."""
        cached = self._shards.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = self.sizes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), epoch])
        order = rng.permutation(n)
        total = self._shard_length(n) * self.world_size
        order = np.resize(order, total)  # truncates (drop_last) or wraps around to pad
        shard = order[self.rank::self.world_size].astype(np.int64)
        self._shards[name] = (epoch, shard)
        return shard
