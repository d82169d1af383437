"""Per-dataset intensity standardisation of the encoder's inputs.

Medical images arrive as stored: 8-bit fundus photographs near 0.3, CT windows near 0.5, binary
masks that are 98% zeros. Fed as they are, every image of a set shares one large average, and what
tells two images apart is a small part of each token. Each dataset's images are therefore
standardised per channel, as ImageNet models standardise theirs, with the dataset's own mean and
standard deviation: an average image then adds little to a token, and the patch projection sees
what differs. The statistics are a cumulative average over the first `STATS_BATCHES` training
batches the encoder embeds (the first batch of any mode when there is none yet, e.g. a frozen
encoder meeting a new dataset), then fixed; they are buffers, saved and exported with the encoder.
"""

import torch
from torch import nn

STATS_BATCHES = 100
MIN_VARIANCE = 1e-4  # a constant channel is centred, not blown up


def stats_key(dataset_key: str, channels: int) -> str:
    """The name under which the encoder keeps a dataset's statistics, e.g. `retinamnist_3ch`."""
    return f"{dataset_key}_{channels}ch"


class IntensityStats(nn.Module):
    """x [B, C, *S] -> (x - mean) / std per channel, with the statistics of one dataset's images."""

    def __init__(self, channels: int, batches: int = STATS_BATCHES):
        super().__init__()
        self.batches = batches
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("square", torch.ones(channels))  # E[x^2]
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._seen: int | None = None  # `count` on the host, so that a step reads no device value
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_seen", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._seen is None:
            self._seen = int(self.count)
        if self._seen == 0 or (self.training and self._seen < self.batches):
            self.update(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        variance = (self.square - self.mean.square()).clamp_min(MIN_VARIANCE)
        return ((x - self.mean.view(shape)) * variance.rsqrt().view(shape)).to(x.dtype)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the per-channel mean and mean square of x [B, C, *S] into the running averages."""
        dims = [0] + list(range(2, x.ndim))
        weight = 1.0 / (self._seen + 1)
        self.mean.lerp_(x.float().mean(dims), weight)
        self.square.lerp_(x.float().square().mean(dims), weight)
        self.count += 1
        self._seen += 1
