"""Argument checks shared by every backend: one contract on CPU and GPU, one clear error per mistake.

Shapes, dtypes and devices are checked on every call. Value checks (keep indices in range) read the
tensor, which on a GPU would wait for it: they run for CPU tensors always, and for GPU tensors only
with `MEDFORMER_KERNELS_DEBUG=1`, so the training hot path never syncs the device.
"""

import math
import os
from dataclasses import dataclass

import torch

from medformer_core.api.errors import UsageError

DEBUG_ENV = "MEDFORMER_KERNELS_DEBUG"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelArgumentError(UsageError, ValueError):
    """Invalid arguments to a kernel (also a ValueError, so plain Python callers can catch it as one)."""


def _fail(op: str, message: str, hint: str | None = None):
    raise KernelArgumentError(f"{op}: {message}", hint=hint)


def _check_tensor(op: str, name: str, t, dims: tuple[int, ...], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        _fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        _fail(op, f"{name} is empty (shape {tuple(t.shape)}); every size must be at least 1")


def _check_float(op: str, named: dict, device: torch.device, dtype: torch.dtype) -> None:
    for name, t in named.items():
        if t.dtype not in DTYPES:
            _fail(op, f"{name} has dtype {t.dtype}", hint="use float32, float16 or bfloat16")
        if t.dtype != dtype:
            _fail(op, f"{name} has dtype {t.dtype} but the input has {dtype}", hint="cast all tensors to one dtype")
        if t.device != device:
            _fail(op, f"{name} is on {t.device} but the input is on {device}", hint="move all tensors to one device")


def _check_values(t: torch.Tensor) -> bool:
    """Whether to read t's values: always on CPU, on a GPU only in debug mode (reading waits for the GPU)."""
    return not t.is_cuda or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def check_attention(q, k, v, scale) -> None:
    """q: [B, H, Nq, d], k and v: [B, H, Nk, d], d in HEAD_DIMS; scale a positive number or None."""
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, (4,), "4-D [B, H, N, d]")
    _check_float(op, {"q": q, "k": k, "v": v}, q.device, q.dtype)
    if k.shape != v.shape:
        _fail(op, f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape [B, H, Nk, d]")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and d ([B, H, N, d])")
    if q.shape[3] not in HEAD_DIMS:
        _fail(op, f"head dim {q.shape[3]} is not supported", hint=f"use one of {HEAD_DIMS} (embed dim / heads)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        _fail(op, f"scale must be a positive finite number or None, got {scale!r}")


@dataclass(frozen=True)
class PatchGeometry:
    """How an input splits into patches, with 2D inputs seen as 3D with depth 1.

    sizes: the patch per spatial axis of x (2 or 3 ints); patch: (pd, ph, pw); grid: (gd, gh, gw) patches
    per axis; n_patches: gd*gh*gw; k: C*pd*ph*pw, the length of one flattened patch (the GEMM's inner
    dimension); embed: E.
    """

    sizes: tuple[int, ...]
    patch: tuple[int, int, int]
    grid: tuple[int, int, int]
    n_patches: int
    k: int
    embed: int


def _patch_tuple(patch, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(patch, int):
        sizes = (patch,) * spatial_dims
    else:
        sizes = tuple(patch) if isinstance(patch, (tuple, list)) else ()
    if len(sizes) != spatial_dims or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in sizes):
        _fail("patch_embed", f"patch must be a positive int or a tuple of {spatial_dims} positive ints, got {patch!r}")
    return sizes


def check_patch_embed(x, weight, bias, pos, patch, keep) -> PatchGeometry:
    """x: [B, C, H, W] or [B, C, D, H, W]; weight: [E, C, *patch]; bias: [E]; pos: [N, E]; keep: [B, n_keep]."""
    op = "patch_embed"
    _check_tensor(op, "x", x, (4, 5), "[B, C, H, W] or [B, C, D, H, W]")
    spatial = tuple(x.shape[2:])
    sizes = _patch_tuple(patch, len(spatial))
    _check_tensor(op, "weight", weight, (x.dim(),), f"Conv layout [E, C, *patch] ({x.dim()}-D for this input)")
    floats = {"weight": weight}
    b, c = x.shape[:2]
    e = weight.shape[0]
    if tuple(weight.shape[1:]) != (c, *sizes):
        _fail(op, f"weight {tuple(weight.shape)} does not match the Conv layout [E, C, *patch] = [E, {c}, "
              f"{', '.join(map(str, sizes))}]", hint="a Linear weight [E, C*prod(patch)] must be reshaped to it")
    bad = [f"{s} by {p}" for s, p in zip(spatial, sizes) if s % p]
    if bad:
        _fail(op, f"patch {sizes} does not divide input size {spatial} ({', '.join(bad)})",
              hint="pad the input to a multiple of the patch size")
    grid = tuple(s // p for s, p in zip(spatial, sizes))
    n_patches = math.prod(grid)
    if bias is not None:
        _check_tensor(op, "bias", bias, (1,), "1-D [E]")
        if bias.shape[0] != e:
            _fail(op, f"bias has {bias.shape[0]} entries but weight has E={e}")
        floats["bias"] = bias
    if pos is not None:
        _check_tensor(op, "pos", pos, (2,), "2-D [N, E]")
        if tuple(pos.shape) != (n_patches, e):
            _fail(op, f"pos {tuple(pos.shape)} must be [N, E] = [{n_patches}, {e}] (N patches of grid {grid})")
        floats["pos"] = pos
    _check_float(op, {"x": x, **floats}, x.device, x.dtype)
    if keep is not None:
        _check_tensor(op, "keep", keep, (2,), "2-D [B, n_keep]")
        if keep.dtype not in (torch.int64, torch.int32):
            _fail(op, f"keep has dtype {keep.dtype}", hint="use int64 patch indices")
        if keep.shape[0] != b or keep.device != x.device:
            _fail(op, f"keep {tuple(keep.shape)} on {keep.device} must be [B={b}, n_keep] on {x.device}")
        if _check_values(keep) and bool(((keep < 0) | (keep >= n_patches)).any()):
            _fail(op, f"keep has indices outside [0, {n_patches}) (the input has {n_patches} patches)")
    pd, ph, pw = (1, *sizes) if len(sizes) == 2 else sizes
    gd, gh, gw = (1, *grid) if len(grid) == 2 else grid
    return PatchGeometry(sizes=sizes, patch=(pd, ph, pw), grid=(gd, gh, gw), n_patches=n_patches,
                         k=c * pd * ph * pw, embed=e)
