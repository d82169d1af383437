"""Learning-rate schedules: linear warmup, then cosine decay to a floor; and a head-only phase
followed by a whole-model phase (LP-FT), each with its own warmup and cosine."""

import math
from collections.abc import Callable

import torch


def cosine_factor(warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """The LR factor at a step: rises linearly over `warmup_steps`, then a cosine to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rises linearly over `warmup_steps`, then follows a cosine to `min_ratio`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(warmup_steps, total_steps, min_ratio))


def head_then_whole(optimizer: torch.optim.Optimizer, head_steps: int, head_scale: float, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Two warmup-cosine cycles: over the first `head_steps` the LR factor is `head_scale` times a
    cycle with a tenth of them as warmup (the head trains alone, as a linear probe does); then a
    cycle over the remaining `total_steps - head_steps` with `warmup_steps` of warmup."""
    head = cosine_factor(max(1, head_steps // 10), head_steps)
    whole = cosine_factor(warmup_steps, total_steps - head_steps)

    def factor(step: int) -> float:
        return head_scale * head(step) if step < head_steps else whole(step - head_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
