"""Public entry points: check the arguments, pick the backend (Triton or torch reference), run it.

fp16/bf16 CUDA tensors use Triton when it is installed; CPU and fp32 tensors use the torch reference.
Under `torch.autocast` on CUDA the floating inputs are cast to the autocast dtype first, as torch's
own matmuls are, so a bf16-autocast training step runs the kernels. `MEDFORMER_KERNELS=triton|torch`
(read at every call) forces one; see `medformer_kernels.backend`.
"""

import torch

from medformer_kernels.backend import backend_for, require_built_for
from medformer_kernels.checks import check_attention, check_patch_embed
from medformer_kernels.reference import attention_sdpa, patch_embed_reference


def _autocast(*tensors):
    """The inputs in CUDA's autocast dtype when autocast is on for a CUDA call; unchanged otherwise."""
    first = tensors[0]
    if not (isinstance(first, torch.Tensor) and first.is_cuda and torch.is_autocast_enabled("cuda")):
        return tensors
    dtype = torch.get_autocast_dtype("cuda")
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v without the score matrix. q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> [B, H, Nq, d].

    Nq and Nk are any lengths (cross attention when they differ); d in 16, 32, 64, 128; fp32, fp16 or
    bf16 (fp32 accumulation); scale defaults to d ** -0.5. Differentiable in q, k and v.
    """
    q, k, v = _autocast(q, k, v)
    check_attention(q, k, v, scale)
    if backend_for(q) == "torch":
        return attention_sdpa(q, k, v, scale)
    from medformer_kernels import triton_attention

    require_built_for(q, triton_attention.INTERPRETED)
    return triton_attention.attention_triton(q, k, v, scale)


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor | None,
                patch: int | tuple[int, ...], keep: torch.Tensor | None = None) -> torch.Tensor:
    """Patch tokens of an image or volume: x [B, C, H, W] or [B, C, D, H, W] -> [B, N, E], or [B, n_keep, E].

    weight: [E, C, *patch] (Conv layout); bias: [E] or None; pos: [N, E] or None, N patches row-major
    over the patch grid (the order of a flattened Conv output); keep: [B, n_keep] patch indices or None,
    then only those patches are embedded (pos gathered at keep). patch: int or one int per spatial axis,
    dividing the input (pad first). Differentiable in x, weight, bias and pos.
    """
    x, weight, bias, pos = _autocast(x, weight, bias, pos)
    geo = check_patch_embed(x, weight, bias, pos, patch, keep)
    if backend_for(x) == "torch":
        return patch_embed_reference(x, weight, bias, pos, geo.sizes, keep)
    from medformer_kernels import triton_patch_embed

    require_built_for(x, triton_patch_embed.INTERPRETED)
    return triton_patch_embed.patch_embed_triton(x, weight, bias, pos, geo, keep)
