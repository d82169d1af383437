"""Flash-style fused attention in Triton: tiled online-softmax forward and one fused backward kernel.

Forward: one program per (query block, batch*head, key range) streams its key/value blocks, keeps a
running row max and row sum (online softmax, base 2; the scale folded into one multiply-add per
score), and stores O and the row logsumexp; no [Nq, Nk] matrix is ever in memory. With more than one
key range (split-KV, for few query blocks over many keys) each range stores a partial O and
logsumexp in fp32 and a combine pass merges them.
Backward: a preprocess kernel takes delta = rowsum(dO * O); then one kernel recomputes the
probabilities from the logsumexp. Its programs accumulate dK and dV for a key block and, in the same
launch, dQ for a query block; for few queries dQ is instead added atomically by the key-block
programs, and for few keys dK/dV are split over query ranges and added atomically (fp32).
Key blocks past Nk and query rows past Nq are masked, so any lengths work; full blocks skip the masks.
Launch configs and splits: `medformer_kernels.attention_plan`, `medformer_kernels.configs`.
Reference: `medformer_kernels.reference.attention_sdpa`; tests: tests/kernels/test_kernels_attention.py;
benchmark: `medformer bench attention`.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from medformer_kernels.attention_plan import (
    COMBINE_BLOCK,
    DELTA_BLOCK,
    INTERPRETER_BWD,
    INTERPRETER_FWD,
    AttentionPlan,
    bwd_candidates,
    fwd_candidates,
    make_plan,
)
from medformer_kernels.backend import interpret_enabled
from medformer_kernels.configs import CACHE, length_class, shape_key

INTERPRETED = interpret_enabled()  # @triton.jit below reads TRITON_INTERPRET once, at import
LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(K, V, kt_ptrs, v_ptrs, b, h, start, cols, key_end, skn, svn,
             MASK: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """k^T: [d, BN] and v: [BN, d] of the key block at `start`. With TMA, K and V are tensor descriptors
    over [B, H, Nk, d] (rows past Nk read as zeros); else pointers, masked past key_end with MASK."""
    if TMA:
        kt = tl.trans(K.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM))
        v = V.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASK:
        kt = tl.load(kt_ptrs + start * skn, mask=cols[None, :] < key_end, other=0.0)
        v = tl.load(v_ptrs + start * svn, mask=cols[:, None] < key_end, other=0.0)
    else:
        kt = tl.load(kt_ptrs + start * skn)
        v = tl.load(v_ptrs + start * svn)
    return kt, v


@triton.jit
def _fwd_step(acc, m_i, l_i, q, kt, v, cols, key_end, qk_scale, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax. q: [BM, d], k^T: [d, BN], v: [BN, d]; scores in log2 units."""
    qk = tl.dot(q, kt, input_precision=PRECISION)  # [BM, BN], unscaled
    if MASK:
        qk = tl.where(cols[None, :] < key_end, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # [BM, BN]: one multiply-add per score
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
              H, N_Q, N_K, KEYS_PER_SPLIT,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Grid (query blocks, B*H, key ranges). Without SPLIT: O [B, H, Nq, d] and LSE [B*H, Nq] (log2 of
    the row sums). With SPLIT: O is the fp32 partial [ranges, B*H, Nq, d] and LSE [ranges, B*H, Nq].
    With TMA, K and V are tensor descriptors (block [1, 1, BLOCK_N, d]) and the key loads use the
    Hopper tensor memory accelerator."""
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    if TMA:
        kt_ptrs = K  # unused: descriptors address blocks by (b, h, key, 0)
        v_ptrs = V
    else:
        kt_ptrs = K + b * skb + h * skh + cols[None, :] * skn + dims[:, None] * skd  # k^T: [d, BN]
        v_ptrs = V + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd  # [BN, d]

    key_start = split * KEYS_PER_SPLIT
    key_end = tl.minimum(N_K, key_start + KEYS_PER_SPLIT)
    full_end = key_start + ((key_end - key_start) // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(key_start, full_end, BLOCK_N):
        kt, v = _load_kv(K, V, kt_ptrs, v_ptrs, bh // H, bh % H, start, start + cols, key_end, skn, svn,
                         False, TMA, BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kt, v, start + cols, key_end, qk_scale, False, PRECISION)
    if full_end < key_end:
        kt, v = _load_kv(K, V, kt_ptrs, v_ptrs, bh // H, bh % H, full_end, full_end + cols, key_end, skn, svn,
                         True, TMA, BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kt, v, full_end + cols, key_end, qk_scale, True, PRECISION)

    out = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    if SPLIT:
        part = (split * tl.num_programs(1) + bh).to(tl.int64) * N_Q + rows
        tl.store(LSE + part, lse, mask=row_ok)
        tl.store(O + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
    else:
        tl.store(LSE + bh * N_Q + rows, lse, mask=row_ok)
        tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_fwd_combine(O_PART, LSE_PART, O, LSE, sob, soh, son, sod, H, BH, N_Q, SPLITS,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (query blocks, B*H): lse = log2(sum_s 2^lse_s), O = sum_s 2^(lse_s - lse) O_s."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_Q
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(LSE_PART + (s * BH + bh).to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0))
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s in range(0, SPLITS):
        part = (s * BH + bh).to(tl.int64) * N_Q + rows
        weight = tl.math.exp2(tl.load(LSE_PART + part, mask=row_ok, other=0.0) - m)
        total += weight
        acc += weight[:, None] * tl.load(O_PART + part[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None],
                                         other=0.0)
    tl.store(LSE + bh * N_Q + rows, m + tl.math.log2(total), mask=row_ok)
    tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
             (acc / total[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


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
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dq_ptrs, rows, query_end, sm_scale, qk_scale,
               MASK: tl.constexpr, DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr):
    """One query block into dK, dV (and, with DQ_ATOMIC, its dQ share added atomically).
    k, v: [BN, d]; q, dO: [BM, d]; probabilities transposed: [BN, BM]."""
    if MASK:
        ok = rows < query_end
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
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q, input_precision=PRECISION)
    if DQ_ATOMIC:
        dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION) * sm_scale  # [BM, d]
        if MASK:
            tl.atomic_add(dq_ptrs, dq, mask=ok[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_block(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                bh, b, h, key_block, split, N_Q, N_K, QUERIES_PER_SPLIT,
                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, KV_ATOMIC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block over one range of queries (all of them unless split)."""
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys[:, None] < N_K
    k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + dims[None, :] * skd, mask=key_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + dims[None, :] * svd, mask=key_ok, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd
    do_ptrs = DO + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd
    lse_ptrs = LSE + bh * N_Q + rows
    delta_ptrs = DELTA + bh * N_Q + rows
    dq_ptrs = DQ + (bh.to(tl.int64) * N_Q + rows[:, None]) * HEAD_DIM + dims[None, :]

    query_start = split * QUERIES_PER_SPLIT
    query_end = tl.minimum(N_Q, query_start + QUERIES_PER_SPLIT)
    full_end = query_start + ((query_end - query_start) // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(query_start, full_end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + start * sqn, do_ptrs + start * sgn, lse_ptrs + start,
                            delta_ptrs + start, dq_ptrs + start * HEAD_DIM, start + rows, query_end,
                            sm_scale, qk_scale, False, DQ_ATOMIC, PRECISION)
    if full_end < query_end:
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptrs + full_end * sqn, do_ptrs + full_end * sgn, lse_ptrs + full_end,
                            delta_ptrs + full_end, dq_ptrs + full_end * HEAD_DIM, full_end + rows, query_end,
                            sm_scale, qk_scale, True, DQ_ATOMIC, PRECISION)

    out = (bh.to(tl.int64) * N_K + keys[:, None]) * HEAD_DIM + dims[None, :]
    if KV_ATOMIC:
        tl.atomic_add(DK + out, dk * sm_scale, mask=key_ok, sem="relaxed")
        tl.atomic_add(DV + out, dv, mask=key_ok, sem="relaxed")
    else:
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


@triton.jit
def _dq_block(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
              bh, b, h, query_block, N_Q, N_K,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block over every key."""
    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
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
    full_end = (N_K // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs + start * skn, v_ptrs + start * svn, start + cols,
                      N_K, qk_scale, False, PRECISION)
    if full_end < N_K:
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs + full_end * skn, v_ptrs + full_end * svn, full_end + cols,
                      N_K, qk_scale, True, PRECISION)

    out = (bh.to(tl.int64) * N_Q + rows[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
              H, N_Q, N_K, KEY_BLOCKS, QUERIES_PER_SPLIT, KV_PROGRAMS, DQ_PROGRAMS,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, KV_ATOMIC: tl.constexpr,
              BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Grid (max(KV_PROGRAMS, DQ_PROGRAMS), B*H). Program p computes dK/dV of key block p % KEY_BLOCKS
    over query range p // KEY_BLOCKS when p < KV_PROGRAMS, and dQ of query block p when p < DQ_PROGRAMS.
    DQ, DK, DV: contiguous [B, H, N, d]; fp32 where added atomically."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < KV_PROGRAMS:
        _dkdv_block(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                    bh, b, h, pid % KEY_BLOCKS, pid // KEY_BLOCKS, N_Q, N_K, QUERIES_PER_SPLIT,
                    HEAD_DIM, PRECISION, DQ_ATOMIC, KV_ATOMIC, BLOCK_M1, BLOCK_N1)
    if pid < DQ_PROGRAMS:
        _dq_block(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                  bh, b, h, pid, N_Q, N_K, HEAD_DIM, PRECISION, BLOCK_M2, BLOCK_N2)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU when it is not the current one (Triton launches on the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee", matching torch); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether a [B, H, N, d] tensor can be read through a TMA descriptor: a Hopper-or-newer GPU, unit
    last stride, 16-byte aligned base and strides (or the interpreter, for tests)."""
    if not INTERPRETED and not (t.is_cuda and _capability(t.device.index)[0] >= 9):
        return False
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in t.stride()[:-1]))


def _key_operands(k, v, config) -> tuple:
    """(K, V, TMA flag) for the forward: descriptors when the config asks for TMA and the layout allows."""
    if not config["TMA"] or not (_tma_ready(k) and _tma_ready(v)):
        return k, v, 0
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [1, 1, config["BLOCK_N"], k.shape[3]]
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), block),
            TensorDescriptor(v, list(v.shape), list(v.stride()), block), 1)


def attention_forward(q, k, v, scale: float, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> (o: [B, H, Nq, d], lse: [B*H, Nq] fp32, base 2)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    block_m, block_n = plan.fwd["BLOCK_M"], plan.fwd["BLOCK_N"]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b * h, n_q), dtype=torch.float32, device=q.device)
    splits = plan.kv_splits
    keys_per_split = _round_up(-(-n_k // splits), block_n)
    splits = -(-n_k // keys_per_split)  # every range holds at least one key
    grid = (triton.cdiv(n_q, block_m), b * h, splits)
    k_in, v_in, tma = _key_operands(k, v, plan.fwd)
    options = {**plan.fwd.launch_options(), "TMA": tma}
    with _on_device(q):
        if splits == 1:
            _attn_fwd[grid](q, k_in, v_in, o, lse, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                            h, n_q, n_k, n_k, HEAD_DIM=d, PRECISION=_precision(q.dtype), SPLIT=False, **options)
            return o, lse
        o_part = torch.empty((splits, b * h, n_q, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, b * h, n_q), dtype=torch.float32, device=q.device)
        _attn_fwd[grid](q, k_in, v_in, o_part, lse_part, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(),
                        *o.stride(), h, n_q, n_k, keys_per_split, HEAD_DIM=d, PRECISION=_precision(q.dtype),
                        SPLIT=True, **options)
        combine_block = 16 if INTERPRETED else COMBINE_BLOCK
        _attn_fwd_combine[(triton.cdiv(n_q, combine_block), b * h)](
            o_part, lse_part, o, lse, *o.stride(), h, b * h, n_q, splits, HEAD_DIM=d, BLOCK_M=combine_block,
            num_warps=4)
    return o, lse


def attention_backward(q, k, v, o, lse, do, scale: float, plan: AttentionPlan,
                       need_dq: bool = True, need_dkdv: bool = True):
    """Gradients (dq, dk, dv) of attention_forward for the output gradient do: [B, H, Nq, d]; None when not needed."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    cfg = plan.bwd
    delta_block = 16 if INTERPRETED else DELTA_BLOCK
    key_blocks = triton.cdiv(n_k, cfg["BLOCK_N1"])
    q_splits = plan.q_splits if need_dkdv else 1
    queries_per_split = _round_up(-(-n_q // q_splits), cfg["BLOCK_M1"])
    q_splits = -(-n_q // queries_per_split)
    dq_atomic = plan.dq_atomic and need_dkdv
    kv_atomic = q_splits > 1
    kv_programs = key_blocks * q_splits if need_dkdv else 0
    dq_programs = triton.cdiv(n_q, cfg["BLOCK_M2"]) if need_dq and not dq_atomic else 0

    def grad_buffer(like, atomic):
        if atomic:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)

    dq = grad_buffer(q, dq_atomic) if need_dq else lse  # an unread placeholder when not needed
    dk, dv = (grad_buffer(k, kv_atomic), grad_buffer(v, kv_atomic)) if need_dkdv else (lse, lse)
    with _on_device(q):
        delta = torch.empty_like(lse)  # [B*H, Nq]
        _attn_bwd_delta[(triton.cdiv(n_q, delta_block), b * h)](
            o, do, delta, *o.stride(), *do.stride(), h, n_q, HEAD_DIM=d, BLOCK_M=delta_block)
        _attn_bwd[(max(kv_programs, dq_programs), b * h)](
            q, k, v, do, lse, delta, dq, dk, dv, scale, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            h, n_q, n_k, key_blocks, queries_per_split, kv_programs, dq_programs,
            HEAD_DIM=d, PRECISION=_precision(q.dtype), DQ_ATOMIC=dq_atomic and need_dq, KV_ATOMIC=kv_atomic,
            **cfg.launch_options())
    dq = dq.to(q.dtype) if need_dq else None
    dk, dv = (dk.to(k.dtype), dv.to(v.dtype)) if need_dkdv else (None, None)
    return dq, dk, dv


def plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> AttentionPlan:
    """The launch plan for q: [B, H, Nq, d] over k, v: [B, H, Nk, d], memoised per shape (tuned on
    these inputs in autotune mode)."""
    key = ("attention", q.device, q.dtype, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3])
    plan = CACHE.plans.get(key)
    if plan is None:
        plan = CACHE.plans[key] = _make_plan(q, k, v, scale)
    return plan


def _make_plan(q, k, v, scale) -> AttentionPlan:
    bh, n_q, n_k, d = q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    if INTERPRETED or not q.is_cuda:
        return AttentionPlan(INTERPRETER_FWD, INTERPRETER_BWD)
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    classes = dict(d=d, nq=length_class(n_q), nk=length_class(n_k))
    fwd_list, bwd_list = fwd_candidates(d, n_q), bwd_candidates(d)

    def plan_with(fwd, bwd):
        return make_plan(fwd, bwd, bh, n_q, n_k, sms)

    fwd = CACHE.choose(shape_key("attention_fwd", q.device, q.dtype, **classes), fwd_list,
                       lambda cfg: attention_forward(q, k, v, scale, plan_with(cfg, bwd_list[0])))

    @functools.cache
    def tuning_inputs():  # (o, lse, dO) for timing backward candidates, made on first need
        return (*attention_forward(q, k, v, scale, plan_with(fwd, bwd_list[0])), torch.randn_like(q))

    def run_backward(cfg):
        o, lse, do = tuning_inputs()
        return attention_backward(q, k, v, o, lse, do, scale, plan_with(fwd, cfg))

    bwd = CACHE.choose(shape_key("attention_bwd", q.device, q.dtype, **classes), bwd_list, run_backward)
    return plan_with(fwd, bwd)


class FusedAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the logsumexp; the backward recomputes probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, plan: AttentionPlan | None):
        plan = plan or plan_attention(q, k, v, scale)
        o, lse = attention_forward(q, k, v, scale, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.plan = scale, plan
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, ctx.scale, ctx.plan, need_q, need_k or need_v)
        return dq, dk, dv, None, None


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     plan: AttentionPlan | None = None) -> torch.Tensor:
    """Fused attention with Triton (arguments already checked).

    q: [B, H, Nq, d], k/v: [B, H, Nk, d] -> [B, H, Nq, d]; scale defaults to d ** -0.5; plan (block
    sizes and splits) defaults to the one chosen for this shape.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FusedAttention.apply(q, k, v, scale, plan)
