"""`mae` (2D) and `mae3d` (3D): masked autoencoding (He et al., 2022) through the Adaptformers.

A random `mask_ratio` of the patches is hidden; the input adapter embeds only the visible ones
(`keep`; the conv stems run as sparse convolutions over them), the latents read them, and one dense
query per masked patch (its position embedding plus a learned mask token) reconstructs that patch's
pixels. The loss is the mean squared error on the
masked patches only, against per-patch normalised pixels when `norm_pix_loss` (MAE's default).
"""

from dataclasses import dataclass

import torch

from medformer_core import OutputSpec, PretextTask, TaskContext, TaskResult, hookimpl
from medformer_core.api.draws import uniform

NORM_EPS = 1e-6


@dataclass(frozen=True)
class MaeOptions:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass(frozen=True)
class Mae3dOptions(MaeOptions):
    mask_ratio: float = 0.85  # volumes are more redundant than images; up to 0.95 works


def random_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random split of the patches -> keep [B, n_keep], masked [B, N - n_keep], sorted.

    n_keep = int(N * (1 - ratio)), at least one patch kept and one masked.
    """
    if num_patches < 2:
        raise ValueError(f"masking needs at least 2 patches, the input has {num_patches}")
    n_keep = min(num_patches - 1, max(1, int(num_patches * (1.0 - ratio))))
    order = uniform((batch, num_patches), generator, device).argsort(dim=1)
    return order[:, :n_keep].sort(dim=1).values, order[:, n_keep:].sort(dim=1).values


def gather_patches(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """patches [B, N, P], index [B, Q] -> [B, Q, P]."""
    return torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))


def normalise(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """patches [B, Q, P] -> (normalised, mean [B, Q, 1], std [B, Q, 1]) per patch."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_EPS).sqrt()
    return (patches - mean) / std, mean, std


class MaskedAutoencoder(PretextTask):
    """Shared by `mae` and `mae3d`, which differ in the inputs they accept and the default ratio."""

    def output_spec(self, info, run):
        return OutputSpec("dense", queries="patches")

    def forward_encoder(self, ctx: TaskContext, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """image [B, C, *S], keep [B, n_keep] -> latents [B, M, E] from the visible patches."""
        return ctx.encode(image, keep=keep)

    def forward_decoder(self, ctx: TaskContext, latents: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """latents [B, M, E], masked [B, n_mask] -> predicted patches [B, n_mask, C * prod(patch)]."""
        return ctx.decode(latents, masked)

    def forward_loss(self, ctx: TaskContext, image: torch.Tensor, prediction: torch.Tensor,
                     masked: torch.Tensor) -> torch.Tensor:
        """Mean squared error of `prediction` [B, n_mask, P] on the masked patches of image [B, C, *S]."""
        target = gather_patches(ctx.patchify(image), masked)
        if self.options.norm_pix_loss:
            target = normalise(target)[0]
        return (prediction - target).pow(2).mean()

    def reconstruct_pixels(self, ctx: TaskContext, image: torch.Tensor, prediction: torch.Tensor,
                           masked: torch.Tensor) -> torch.Tensor:
        """prediction [B, n_mask, P] -> pixel values of the masked patches (undoing normalisation
        with the true patch statistics, as MAE's visualisation does)."""
        if not self.options.norm_pix_loss:
            return prediction
        _, mean, std = normalise(gather_patches(ctx.patchify(image), masked))
        return prediction * std + mean

    def masked_forward(self, ctx, batch, generator):
        image = batch["image"]  # [B, C, *S]
        keep, masked = random_masking(image.shape[0], ctx.num_patches(image), self.options.mask_ratio,
                                      generator, image.device)
        prediction = self.forward_decoder(ctx, self.forward_encoder(ctx, image, keep), masked)
        return image, masked, prediction

    def forward(self, ctx, batch, generator):
        image, masked, prediction = self.masked_forward(ctx, batch, generator)
        loss = self.forward_loss(ctx, image, prediction, masked)
        with torch.no_grad():
            target = gather_patches(ctx.patchify(image), masked)
            pixel_mse = (self.reconstruct_pixels(ctx, image, prediction, masked) - target).pow(2).mean()
        return TaskResult(loss, {"pixel_mse": pixel_mse.item()})

    def pictures(self, ctx, batch, generator):
        image, masked, prediction = self.masked_forward(ctx, batch, generator)
        patches = ctx.patchify(image)  # [B, N, P]
        rows = masked[..., None].expand(-1, -1, patches.shape[-1])
        hidden = patches.scatter(1, rows, torch.full_like(prediction, 0.5))
        filled = patches.scatter(1, rows, self.reconstruct_pixels(ctx, image, prediction, masked))
        return {"input": image, "masked": ctx.unpatchify(hidden, image),
                "reconstruction": ctx.unpatchify(filled, image)}


class Mae2d(MaskedAutoencoder):
    name = "mae"
    description = "Masked autoencoder on 2D images: reconstruct masked patches from visible ones"
    spatial_dims = (2,)
    Options = MaeOptions


class Mae3d(MaskedAutoencoder):
    name = "mae3d"
    description = "Masked autoencoder on 3D volumes: reconstruct masked patches from visible ones"
    spatial_dims = (3,)
    Options = Mae3dOptions


@hookimpl
def register_pretext_tasks(register):
    register(Mae2d())
    register(Mae3d())
