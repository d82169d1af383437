"""Random draws for pretext tasks from an explicit torch.Generator.

Each draw is made on the generator's device and moved to `device`, so a CPU generator drives a GPU
run too, and the same seed makes the same views on any device.
"""

import torch


def uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 in [0, 1) of `shape`."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 standard normal of `shape`."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def integers(high: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """int64 uniform in [0, high) of `shape`."""
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)


def permutations(rows: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[rows, n] int64, each row an independent random permutation of range(n)."""
    return uniform((rows, n), generator, device).argsort(dim=1)
