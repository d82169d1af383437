"""Combining the losses of several tasks into one: fixed weights or learned uncertainty weighting."""

import torch
from torch import nn

from medformer_core.api.errors import UsageError

WEIGHTINGS = ("fixed", "uncertainty")


class FixedWeighting(nn.Module):
    """total = sum_i w_i * L_i with the tasks' configured weights."""

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * loss for name, loss in losses.items())

    def current_weights(self) -> dict[str, float]:
        return dict(self.weights)


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018).

    total = sum_i w_i * (exp(-s_i) * L_i + s_i), with s_i = log sigma_i^2 learned per task; a task
    whose loss stays noisy or large is down-weighted, and s_i cannot run off since it is penalised.
    """

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)
        self.names = sorted(weights)
        self.log_variance = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name, loss in losses.items():
            s = self.log_variance[self.names.index(name)]
            total = total + self.weights[name] * (torch.exp(-s) * loss + s)
        return total

    def current_weights(self) -> dict[str, float]:
        precision = torch.exp(-self.log_variance.detach())
        return {name: self.weights[name] * float(precision[i]) for i, name in enumerate(self.names)}


def make_weighting(kind: str, weights: dict[str, float]) -> nn.Module:
    if kind == "fixed":
        return FixedWeighting(weights)
    if kind == "uncertainty":
        return UncertaintyWeighting(weights)
    raise UsageError(f"unknown loss weighting '{kind}'", hint=f"choose one of: {', '.join(WEIGHTINGS)}")
