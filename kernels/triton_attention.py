"""Flash-style fused attention in Triton: tiled online-softmax forward and a recomputing backward.

Forward: one program per (query block, batch*head) streams the key/value blocks, keeps a running row
max and row sum (online softmax, base 2), and stores O and the row logsumexp; no [Nq, Nk] matrix is
ever in memory. Backward recomputes the probabilities from that logsumexp: a preprocess kernel takes
delta = rowsum(dO * O), one kernel per key block accumulates dK and dV over the queries, and one
kernel per query block accumulates dQ (no atomics, deterministic). Key blocks past Nk and query rows
past Nq are masked, so any lengths work; full blocks skip the masks.
Reference: `medformer_kernels.reference.attention_sdpa`; tests: tests/kernels/test_kernels_attention.py;
benchmark: `medformer bench attention`.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from medformer_kernels.backend import interpret_enabled

INTERPRETED = interpret_enabled()  # @triton.jit below reads TRITON_INTERPRET once, at import
LOG2E = 1.4426950408889634

# (query block, key block, warps, pipeline stages) tried by the autotuner on a GPU: few, since each
# config compiles once per head dim and dtype. dK/dV programs own a key block and stream narrow
# query blocks, dQ programs the reverse; small blocks serve short sequences and fp32.
FWD_BLOCKS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
DKDV_BLOCKS = [(32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)]
DQ_BLOCKS = [(128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
DELTA_BLOCK = 16 if INTERPRETED else 128


def _configs(blocks: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs; a single small one under the interpreter, so CPU tests stay fast."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


@triton.jit
def _fwd_step(acc, m_i, l_i, q, kt_ptrs, v_ptrs, cols, N_K, qk_scale,
              MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax. q: [BM, d], k^T: [d, BN], v: [BN, d]; scores in log2 units."""
    if MASK:
        kt = tl.load(kt_ptrs, mask=cols[None, :] < N_K, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < N_K, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BM, BN]
    if MASK:
        s = tl.where(cols[None, :] < N_K, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
    p = tl.math.exp2(s - m_new[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=_configs(FWD_BLOCKS), key=["N_Q", "N_K", "HEAD_DIM"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
              H, N_Q, N_K,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks, B*H). Writes O [B, H, Nq, d] and LSE [B*H, Nq] (log2 of the softmax row sums)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    kt_ptrs = K + b * skb + h * skh + cols[None, :] * skn + dims[:, None] * skd  # k^T: [d, BN]
    v_ptrs = V + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd  # [BN, d]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kt_ptrs + start * skn, v_ptrs + start * svn, start + cols,
                                  N_K, qk_scale, False, PRECISION)
    if n_full < N_K:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kt_ptrs + n_full * skn, v_ptrs + n_full * svn, n_full + cols,
                                  N_K, qk_scale, True, PRECISION)

    tl.store(LSE + bh * N_Q + rows, m_i + tl.math.log2(l_i), mask=row_ok)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, son, sod, sgb, sgh, sgn, sgd, H, N_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (query blocks, B*H). DELTA [B*H, Nq] = rowsum(dO * O), in fp32."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < N_Q
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd, mask=ok, other=0.0)
    tl.store(DELTA + bh * N_Q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < N_Q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows, N_Q, qk_scale,
               MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One query block into dK, dV. k, v: [BN, d]; q, dO: [BM, d]; probabilities transposed: [BN, BM]."""
    if MASK:
        ok = rows < N_Q
        q = tl.load(q_ptrs, mask=ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=ok[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=ok, other=0.0)
        delta = tl.load(delta_ptrs, mask=ok, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # [BN, BM]
    if MASK:
        pt = tl.where(ok[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs(DKDV_BLOCKS), key=["N_Q", "N_K", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                   H, N_Q, N_K,
                   HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (key blocks, B*H). DK, DV: contiguous [B, H, Nk, d]."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys[:, None] < N_K
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + dims[None, :] * skd, mask=key_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :] * svd, mask=key_ok, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd
    do_ptrs = DO + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd
    lse_ptrs = LSE + bh * N_Q + rows
    delta_ptrs = DELTA + bh * N_Q + rows

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + start * sqn, do_ptrs + start * sgn, lse_ptrs + start,
                            delta_ptrs + start, start + rows, N_Q, qk_scale, False, PRECISION)
    if m_full < N_Q:
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + m_full * sqn, do_ptrs + m_full * sgn, lse_ptrs + m_full,
                            delta_ptrs + m_full, m_full + rows, N_Q, qk_scale, True, PRECISION)

    out = (bh.to(tl.int64) * N_K + keys[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, cols, N_K, qk_scale,
             MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key block into dQ. q, dO: [BM, d]; k, v: [BN, d]; probabilities: [BM, BN]."""
    if MASK:
        k = tl.load(k_ptrs, mask=cols[:, None] < N_K, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < N_K, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])  # [BM, BN]
    if MASK:
        p = tl.where(cols[None, :] < N_K, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs(DQ_BLOCKS), key=["N_Q", "N_K", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                 H, N_Q, N_K,
                 HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks, B*H). DQ: contiguous [B, H, Nq, d]."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
    k_ptrs = K + b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd
    v_ptrs = V + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs + start * skn, v_ptrs + start * svn, start + cols,
                      N_K, qk_scale, False, PRECISION)
    if n_full < N_K:
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs + n_full * skn, v_ptrs + n_full * svn, n_full + cols,
                      N_K, qk_scale, True, PRECISION)

    out = (bh.to(tl.int64) * N_Q + rows[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee", matching torch); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> (o: [B, H, Nq, d], lse: [B*H, Nq] fp32, base 2)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b * h, n_q), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)

    with _on_device(q):
        _attn_fwd[grid](q, k, v, o, lse, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                        h, n_q, n_k, HEAD_DIM=d, PRECISION=_precision(q.dtype))
    return o, lse


def attention_backward(q, k, v, o, lse, do, scale: float, need_dq: bool = True, need_dkdv: bool = True):
    """Gradients (dq, dk, dv) of attention_forward for the output gradient do: [B, H, Nq, d]; None when not needed."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    dq = dk = dv = None
    with _on_device(q):
        delta = torch.empty_like(lse)  # [B*H, Nq]
        _attn_bwd_delta[(triton.cdiv(n_q, DELTA_BLOCK), b * h)](
            o, do, delta, *o.stride(), *do.stride(), h, n_q, HEAD_DIM=d, BLOCK_M=DELTA_BLOCK)
        if need_dkdv:
            dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
            _attn_bwd_dkdv[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h)](
                q, k, v, do, lse, delta, dk, dv, scale, scale * LOG2E, *strides,
                h, n_q, n_k, HEAD_DIM=d, PRECISION=_precision(q.dtype))
        if need_dq:
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            _attn_bwd_dq[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)](
                q, k, v, do, lse, delta, dq, scale, scale * LOG2E, *strides,
                h, n_q, n_k, HEAD_DIM=d, PRECISION=_precision(q.dtype))
    return dq, dk, dv


class FusedAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the logsumexp; the backward recomputes probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        o, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, ctx.scale, need_q, need_k or need_v)
        return dq, dk, dv, None


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Fused attention with Triton (arguments already checked).

    q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> [B, H, Nq, d]; scale defaults to d ** -0.5.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FusedAttention.apply(q, k, v, scale)
