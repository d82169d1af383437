"""`domain-adversarial`: a domain classifier behind a gradient reversal layer (Ganin et al., 2016).

The classifier (a query over the latents and a `label` head, one for all datasets) learns which of
the run's datasets a batch comes from; the gradient reversal layer passes the latents through
unchanged but multiplies the gradient flowing back into the encoder by -`coefficient`, so the
encoder learns features the classifier cannot tell apart: domain-invariant across datasets or
sites. The coefficient is fixed (DANN ramps it up from 0); what it sets is the reversed gradient's
size relative to the other tasks' gradients in the encoder. Needs at least two datasets in the
run; the domains are the run's dataset names in sorted order.
"""

from dataclasses import dataclass

import torch

from medformer_core import OutputSpec, PretextTask, classification_result, hookimpl


@dataclass(frozen=True)
class DomainAdversarialOptions:
    coefficient: float = 1.0

    def __post_init__(self):
        if self.coefficient < 0:
            raise ValueError(f"coefficient must be >= 0, got {self.coefficient}")


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by -coefficient on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    return GradientReversal.apply(x, coefficient)


def domains(run) -> list[str]:
    return sorted(info.name for info in run)


class DomainAdversarial(PretextTask):
    name = "domain-adversarial"
    description = "Dataset classifier behind gradient reversal: domain-invariant features across datasets"
    spatial_dims = (2, 3)
    Options = DomainAdversarialOptions

    def reject_reason(self, info, run):
        reason = super().reject_reason(info, run)
        if reason is None and len(run) < 2:
            return "the only dataset of the run; domain-adversarial needs at least two"
        return reason

    def output_spec(self, info, run):
        return OutputSpec("label", queries=1, options={"num_outputs": len(run)}, shared=True)

    def forward(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        latents = reverse_gradient(ctx.encode(image), self.options.coefficient)
        logits = ctx.decode(latents)  # [B, domains]
        domain = torch.full((image.shape[0],), domains(ctx.run).index(ctx.info.name), device=image.device)
        return classification_result(logits, domain)


@hookimpl
def register_pretext_tasks(register):
    register(DomainAdversarial())
