"""Fused 2D/3D patch embedding in Triton: gather patches by index arithmetic, one GEMM, bias + pos epilogue.

Row m of the token matrix is (sample b, token t); its patch n is t, or keep[b, t] with `keep`, so only
the kept patches are ever read. Column k of a patch is (c, pd, ph, pw), the order of a Conv weight
[E, C, *patch]. Both are turned into offsets in x straight from its strides (no im2col copy); 2D
inputs are seen as 3D with depth 1. The backward computes dW with a second Triton kernel that gathers
patches the same way (split over rows into fp32 partial sums, for parallelism when E*K is small); a
third kernel reduces dbias and dpos (summed over the batch, or added atomically at the kept patches);
dx (only when x requires grad) uses torch ops: a GEMM and a reshape scatter.
Configs are pinned per shape class and cached (`medformer_kernels.configs`): no per-call autotune.
Reference: `medformer_kernels.reference.patch_embed_reference`; tests:
tests/kernels/test_kernels_patch_embed.py; benchmark: `medformer bench patch-embed`.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from medformer_core.model.patches import unpatchify
from medformer_kernels.backend import interpret_enabled
from medformer_kernels.checks import PatchGeometry
from medformer_kernels.configs import CACHE, LaunchConfig, shape_key

INTERPRETED = interpret_enabled()  # @triton.jit below reads TRITON_INTERPRET once, at import

# Candidates for a GPU (fp16/bf16; none spills on sm_90, see compile_report), the pinned default
# first. The forward writes many more bytes (E per token) than it reads (C*prod(patch)), so wide E
# blocks; dW reduces over rows, in BLOCK_M steps.
FWD_CANDIDATES = [LaunchConfig.of(8, 3, BLOCK_M=64, BLOCK_E=128, BLOCK_K=32),
                  LaunchConfig.of(8, 3, BLOCK_M=128, BLOCK_E=128, BLOCK_K=32),
                  LaunchConfig.of(4, 4, BLOCK_M=128, BLOCK_E=64, BLOCK_K=32)]
DW_CANDIDATES = [LaunchConfig.of(4, 3, BLOCK_M=64, BLOCK_E=64, BLOCK_K=64),
                 LaunchConfig.of(8, 3, BLOCK_M=128, BLOCK_E=64, BLOCK_K=64),
                 LaunchConfig.of(4, 3, BLOCK_M=64, BLOCK_E=128, BLOCK_K=32)]
REDUCE_CONFIG = LaunchConfig.of(4, 1, BLOCK_M=32, BLOCK_E=128)
INTERPRETER_CONFIG = LaunchConfig.of(1, 1, BLOCK_M=16, BLOCK_E=16, BLOCK_K=16)
INTERPRETER_REDUCE = LaunchConfig.of(1, 1, BLOCK_M=16, BLOCK_E=16)


def _config(kernel: str, candidates: list[LaunchConfig], x: torch.Tensor, run, **sizes: int) -> LaunchConfig:
    """The config of one launch: pinned, cached, or tuned in autotune mode (see medformer_kernels.configs)."""
    if INTERPRETED or not x.is_cuda:
        return INTERPRETER_CONFIG
    return CACHE.choose(shape_key(kernel, x.device, x.dtype, **sizes), candidates, run)


@triton.jit
def _patch_rows(rows, row_ok, KEEP, skb, skt, N_TOK, GH, GW, sxb, sxd, sxh, sxw,
                PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Token rows -> (patch index n, offset in x of the patch's first element), both [BM]."""
    b = rows // N_TOK
    t = rows % N_TOK
    if HAS_KEEP:
        n = tl.load(KEEP + b * skb + t * skt, mask=row_ok, other=0).to(tl.int32)
    else:
        n = t
    gd = n // (GH * GW)
    gh = (n // GW) % GH
    gw = n % GW
    base = (b.to(tl.int64) * sxb + (gd * PD).to(tl.int64) * sxd + (gh * PH).to(tl.int64) * sxh
            + (gw * PW).to(tl.int64) * sxw)
    return n, base


@triton.jit
def _patch_cols(ks, sxc, sxd, sxh, sxw, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Patch-vector columns k = (c, pd, ph, pw) -> offset in x from the patch's first element, [BK]."""
    c = ks // (PD * PH * PW)
    r = ks % (PD * PH * PW)
    return c.to(tl.int64) * sxc + (r // (PH * PW)) * sxd + ((r // PW) % PH) * sxh + (r % PW) * sxw


@triton.jit
def _patch_embed_fwd(X, W, BIAS, POS, KEEP, OUT,
                     sxb, sxc, sxd, sxh, sxw, swe, swk, spn, spe, skb, skt,
                     M, E, K_DIM, N_TOK, GH, GW,
                     PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_KEEP: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (row blocks, embed blocks). X: [B, C, D, H, W] (strides sx*), W: [E, K], OUT: contiguous [M, E]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < M
    e_ok = es < E
    n, base = _patch_rows(rows, row_ok, KEEP, skb, skt, N_TOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW, HAS_KEEP)

    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K_DIM
        cols = _patch_cols(ks, sxc, sxd, sxh, sxw, PD, PH, PW)
        a = tl.load(X + base[:, None] + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(W + ks[:, None] * swk + es[None, :] * swe,
                    mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # [BK, BE]
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + es, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & e_ok[None, :]
    if HAS_POS:
        acc += tl.load(POS + n.to(tl.int64)[:, None] * spn + es[None, :] * spe, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows.to(tl.int64)[:, None] * E + es[None, :], acc.to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit
def _patch_embed_dw(X, DOUT, KEEP, DW,
                    sxb, sxc, sxd, sxh, sxw, sgm, sge, skb, skt,
                    M, E, K_DIM, N_TOK, GH, GW, SPLITS,
                    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_KEEP: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (embed blocks, patch-vector blocks, SPLITS). DW: [SPLITS, E, K] fp32, split s summing its own rows."""
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    e_ok = es < E
    k_ok = ks < K_DIM
    cols = _patch_cols(ks, sxc, sxd, sxh, sxw, PD, PH, PW)

    acc = tl.zeros([BLOCK_E, BLOCK_K], tl.float32)
    blocks_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), SPLITS)
    for j in range(0, blocks_per_split):
        rows = (split * blocks_per_split + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        n, base = _patch_rows(rows, row_ok, KEEP, skb, skt, N_TOK, GH, GW, sxb, sxd, sxh, sxw, PD, PH, PW, HAS_KEEP)
        gt = tl.load(DOUT + rows.to(tl.int64)[None, :] * sgm + es[:, None] * sge,
                     mask=e_ok[:, None] & row_ok[None, :], other=0.0)  # dOut^T: [BE, BM]
        a = tl.load(X + base[:, None] + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        acc = tl.dot(gt, a, acc, input_precision=PRECISION)

    dw_ptrs = DW + split.to(tl.int64) * E * K_DIM + es[:, None] * K_DIM + ks[None, :]
    tl.store(dw_ptrs, acc, mask=e_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_dbias_dpos(DOUT, KEEP, DBIAS, DPOS, sgb, sgt, sge, skb, skt, B, N_TOK, E,
                            HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_KEEP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Grid (token blocks, embed blocks), looping over the batch. DOUT: [B, T, E]. DBIAS: [E] fp32,
    zeroed, added to atomically. DPOS: [N, E]; without keep each program stores its tokens' batch sum,
    with keep (fp32, zeroed) each token is added atomically at its patch keep[b, t]."""
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    tok_ok = toks < N_TOK
    e_ok = es < E
    ok = tok_ok[:, None] & e_ok[None, :]
    bias_acc = tl.zeros([BLOCK_E], tl.float32)
    pos_acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    g_ptrs = DOUT + toks[:, None] * sgt + es[None, :] * sge
    for b in range(0, B):
        g = tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32)  # [BM, BE] of sample b
        g_ptrs += sgb
        bias_acc += tl.sum(g, 0)
        if HAS_POS and HAS_KEEP:
            n = tl.load(KEEP + b * skb + toks * skt, mask=tok_ok, other=0).to(tl.int64)
            tl.atomic_add(DPOS + n[:, None] * E + es[None, :], g, mask=ok, sem="relaxed")
        elif HAS_POS:
            pos_acc += g
    if HAS_BIAS:
        tl.atomic_add(DBIAS + es, bias_acc, mask=e_ok, sem="relaxed")
    if HAS_POS and not HAS_KEEP:
        tl.store(DPOS + toks.to(tl.int64)[:, None] * E + es[None, :], pos_acc.to(DPOS.dtype.element_ty), mask=ok)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU when it is not the current one (Triton launches on the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee", matching torch); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _as_5d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 1, H, W] (a view); 3D inputs unchanged."""
    return x if x.dim() == 5 else x.unsqueeze(2)


def _keep_args(keep: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(tensor, stride_b, stride_t) for the kernel; an unread placeholder without keep."""
    return (dummy, 0, 0) if keep is None else (keep, *keep.stride())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(m: int, e: int, k: int, config: LaunchConfig, device: torch.device) -> int:
    """How many row ranges the dW reduction is split into: enough programs to fill the GPU."""
    if INTERPRETED or device.type != "cuda":
        return min(2, triton.cdiv(m, 16))
    tiles = triton.cdiv(e, config["BLOCK_E"]) * triton.cdiv(k, config["BLOCK_K"])
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(4 * sms // tiles, triton.cdiv(m, 4 * config["BLOCK_M"])))


def patch_embed_forward(x, weight, bias, pos, keep, geo: PatchGeometry, config: LaunchConfig | None = None):
    """x: [B, C, *S] -> tokens [B, T, E], T = N or n_keep; weight [E, C, *patch], bias [E], pos [N, E], keep [B, T]."""
    x5 = _as_5d(x)
    w2 = weight.reshape(geo.embed, geo.k)  # [E, K]
    b = x.shape[0]
    n_tok = geo.n_patches if keep is None else keep.shape[1]
    m = b * n_tok
    if config is None:
        config = _config("patch_embed_fwd", FWD_CANDIDATES, x,
                         lambda cfg: patch_embed_forward(x, weight, bias, pos, keep, geo, cfg),
                         k=geo.k, e=geo.embed, keep=keep is not None)
    out = torch.empty((b, n_tok, geo.embed), dtype=x.dtype, device=x.device)
    pos_t, spn, spe = (w2, 0, 0) if pos is None else (pos, *pos.stride())  # absent tensors: unread placeholders
    keep_t, skb, skt = _keep_args(keep, w2)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(geo.embed, config["BLOCK_E"]))
    with _on_device(x):
        _patch_embed_fwd[grid](
            x5, w2, w2 if bias is None else bias, pos_t, keep_t, out,
            *x5.stride(), *w2.stride(), spn, spe, skb, skt,
            m, geo.embed, geo.k, n_tok, geo.grid[1], geo.grid[2], *geo.patch,
            HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_KEEP=keep is not None,
            PRECISION=_precision(x.dtype), **config.launch_options())
    return out


def patch_embed_weight_grad(x, dout, keep, geo: PatchGeometry, config: LaunchConfig | None = None) -> torch.Tensor:
    """dW [E, K] (fp32) = dout^T @ patches, with patches gathered from x by index arithmetic. dout: [B, T, E]."""
    x5 = _as_5d(x)
    b, n_tok, e = dout.shape
    m = b * n_tok
    if config is None:
        config = _config("patch_embed_dw", DW_CANDIDATES, x,
                         lambda cfg: patch_embed_weight_grad(x, dout, keep, geo, cfg),
                         k=geo.k, e=e, keep=keep is not None)
    g = dout.reshape(m, e)  # [M, E]
    splits = _splits(m, e, geo.k, config, x.device)
    partial = torch.empty((splits, e, geo.k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(e, config["BLOCK_E"]), triton.cdiv(geo.k, config["BLOCK_K"]), splits)
    keep_t, skb, skt = _keep_args(keep, g)
    with _on_device(x):
        _patch_embed_dw[grid](
            x5, g, keep_t, partial, *x5.stride(), *g.stride(), skb, skt,
            m, e, geo.k, n_tok, geo.grid[1], geo.grid[2], splits, *geo.patch,
            HAS_KEEP=keep is not None, PRECISION=_precision(x.dtype), **config.launch_options())
    return partial[0] if splits == 1 else partial.sum(0)


def patch_embed_bias_pos_grads(dout, keep, n_patches: int, need_bias: bool, need_pos: bool):
    """(dbias [E] or None, dpos [N, E] or None) of dout: [B, T, E], in dout's dtype, reduced by one kernel."""
    b, n_tok, e = dout.shape
    config = INTERPRETER_REDUCE if INTERPRETED or not dout.is_cuda else REDUCE_CONFIG
    dbias = torch.zeros(e, dtype=torch.float32, device=dout.device) if need_bias else None
    dpos = None
    if need_pos:
        dpos = (torch.zeros((n_patches, e), dtype=torch.float32, device=dout.device) if keep is not None
                else torch.empty((n_patches, e), dtype=dout.dtype, device=dout.device))
    keep_t, skb, skt = _keep_args(keep, dout)
    grid = (triton.cdiv(n_tok, config["BLOCK_M"]), triton.cdiv(e, config["BLOCK_E"]))
    with _on_device(dout):
        _patch_embed_dbias_dpos[grid](
            dout, keep_t, dout if dbias is None else dbias, dout if dpos is None else dpos,
            *dout.stride(), skb, skt, b, n_tok, e,
            HAS_BIAS=need_bias, HAS_POS=need_pos, HAS_KEEP=keep is not None, **config.launch_options())
    return (None if dbias is None else dbias.to(dout.dtype)), (None if dpos is None else dpos.to(dout.dtype))


class FusedPatchEmbed(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and keep; dW, dbias and dpos by Triton, dx by torch ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, pos, keep, geo: PatchGeometry):
        ctx.save_for_backward(x, weight, keep)
        ctx.geo = geo
        return patch_embed_forward(x, weight, bias, pos, keep, geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, keep = ctx.saved_tensors
        geo = ctx.geo
        need_x, need_w, need_bias, need_pos = ctx.needs_input_grad[:4]
        e = geo.embed
        dx = dw = dbias = dpos = None
        if need_w:
            dw = patch_embed_weight_grad(x, dout, keep, geo).to(weight.dtype).reshape(weight.shape)
        if need_bias or need_pos:
            dbias, dpos = patch_embed_bias_pos_grads(dout, keep, geo.n_patches, need_bias, need_pos)
        if need_x:
            dpatch = dout @ weight.reshape(e, geo.k)  # [B, T, K]
            if keep is not None:
                index = keep.long()[..., None].expand(-1, -1, geo.k)
                dpatch = dpatch.new_zeros((x.shape[0], geo.n_patches, geo.k)).scatter_add_(1, index, dpatch)
            dx = unpatchify(dpatch, geo.sizes, x.shape[1], tuple(x.shape[2:]))
        return dx, dw, dbias, dpos, None, None


def patch_embed_triton(x, weight, bias, pos, geo: PatchGeometry, keep=None) -> torch.Tensor:
    """Fused patch embedding with Triton (arguments already checked): x [B, C, *S] -> tokens [B, N or n_keep, E]."""
    return FusedPatchEmbed.apply(x, weight, bias, pos, keep, geo)
