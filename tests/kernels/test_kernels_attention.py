"""Fused attention (Triton) against the torch reference: values and gradients on awkward shapes.

CPU: the kernels run in Triton's interpreter (tiny shapes, fp32 and fp16). GPU (marked): bf16 and fp16
(the dtypes the GPU kernels take), larger shapes and the benchmark shapes, judged against torch's own
error in the same dtype.
"""

import pytest
import torch

from medformer_kernels.reference import attention_naive, attention_sdpa

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
NAMES = ("out", "dq", "dk", "dv")


def _inputs(b, h, nq, nk, d, dtype, device, seed=0):
    """q: [B, H, Nq, d], k/v: [B, H, Nk, d], all requiring grad, and an output gradient [B, H, Nq, d]."""
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        return torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    return make(nq), make(nk), make(nk), torch.randn(b, h, nq, d, generator=gen).to(device=device, dtype=dtype)


def _forward_backward(fn, q, k, v, grad_out, scale=None):
    """(out, dq, dk, dv); a gradient is None for an input that does not require grad."""
    out = fn(q, k, v, scale)
    wanted = [t for t in (q, k, v) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return (out, *(next(grads) if t.requires_grad else None for t in (q, k, v)))


def _fp32_reference(q, k, v, grad_out, scale=None):
    """SDPA in fp32 on the same (already rounded) inputs."""
    leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in (q, k, v)]
    return _forward_backward(attention_sdpa, *leaves, grad_out.float(), scale)


def _triton(q, k, v, grad_out, scale=None, plan=None):
    from medformer_kernels.triton_attention import attention_triton

    return _forward_backward(lambda *args: attention_triton(*args, plan=plan), q, k, v, grad_out, scale)


def _interpreter_plan(tma=False, **splits):
    from medformer_kernels.attention_plan import INTERPRETER_BWD, INTERPRETER_FWD, AttentionPlan
    from medformer_kernels.configs import LaunchConfig

    fwd = LaunchConfig.of(1, 1, BLOCK_M=16, BLOCK_N=16, TMA=1) if tma else INTERPRETER_FWD
    return AttentionPlan(fwd, INTERPRETER_BWD, **splits)


def _assert_matches(ours, ref, dtype):
    for name, a, b in zip(NAMES, ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("n", [1, 7, 50, 65])
def test_self_attention_matches_reference(triton_device, n, d, dtype):
    q, k, v, grad_out = _inputs(2, 2, n, n, d, dtype, triton_device)
    _assert_matches(_triton(q, k, v, grad_out), _fp32_reference(q, k, v, grad_out), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("nq,nk", [(1, 65), (7, 50), (65, 7), (50, 1), (17, 33)])
def test_cross_attention_matches_reference(triton_device, nq, nk, dtype):
    q, k, v, grad_out = _inputs(1, 3, nq, nk, 16, dtype, triton_device, seed=1)
    _assert_matches(_triton(q, k, v, grad_out), _fp32_reference(q, k, v, grad_out), dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_large_head_dims_match_reference(triton_device, d):
    q, k, v, grad_out = _inputs(1, 1, 20, 33, d, torch.float32, triton_device, seed=2)
    _assert_matches(_triton(q, k, v, grad_out), _fp32_reference(q, k, v, grad_out), torch.float32)


SPLIT_PLANS = {"split-kv fwd": dict(kv_splits=3), "atomic dq": dict(dq_atomic=True),
               "split-q dkdv": dict(q_splits=3), "all": dict(kv_splits=2, q_splits=2, dq_atomic=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", SPLIT_PLANS.values(), ids=SPLIT_PLANS.keys())
@pytest.mark.parametrize("nq,nk", [(7, 65), (65, 7), (40, 49)])
def test_split_and_atomic_paths_match_reference(triton_device, nq, nk, splits, dtype):
    """The cross-attention paths (key ranges merged, dQ or dK/dV added atomically) on ragged lengths,
    with more ranges asked for than some lengths have blocks."""
    q, k, v, grad_out = _inputs(2, 2, nq, nk, 16, dtype, triton_device, seed=7)
    plan = _interpreter_plan(**splits)
    _assert_matches(_triton(q, k, v, grad_out, plan=plan), _fp32_reference(q, k, v, grad_out), dtype)


@pytest.mark.parametrize("splits", [{}, {"kv_splits": 3}], ids=["one range", "split-KV"])
@pytest.mark.parametrize("nq,nk", [(7, 65), (33, 17)])
def test_tma_key_loads_match_reference(triton_device, nq, nk, splits):
    """Keys and values read through tensor descriptors (zero-filled past Nk), from a packed projection."""
    gen = torch.Generator().manual_seed(9)
    kv = torch.randn(2, nk, 2, 3, 16, generator=gen).to(triton_device).requires_grad_()
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, Nk, d], strided
    q = torch.randn(2, 3, nq, 16, generator=gen).to(triton_device).requires_grad_()
    grad_out = torch.randn(2, 3, nq, 16, generator=gen).to(triton_device)
    plan = _interpreter_plan(tma=True, **splits)
    _assert_matches(_triton(q, k, v, grad_out, plan=plan), _fp32_reference(q, k, v, grad_out), torch.float32)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)], ids=["q-only", "kv-only"])
def test_atomic_paths_with_partial_gradients(triton_device, needs):
    q, k, v, grad_out = _inputs(1, 2, 9, 40, 16, torch.float32, triton_device, seed=8)
    for t, need in zip((q, k, v), needs):
        t.requires_grad_(need)
    plan = _interpreter_plan(kv_splits=2, q_splits=2, dq_atomic=True)
    _assert_matches(_triton(q, k, v, grad_out, plan=plan), _fp32_reference(q, k, v, grad_out), torch.float32)


def test_strided_inputs_and_explicit_scale(triton_device):
    """q, k, v sliced from one packed projection [B, N, 3, H, d], as a transformer block makes them."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 19, 3, 2, 32, generator=gen).to(triton_device).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d], not contiguous
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 2, 19, 32, generator=gen).to(triton_device)
    _assert_matches(_triton(q, k, v, grad_out, scale=0.3), _fp32_reference(q, k, v, grad_out, scale=0.3),
                    torch.float32)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)], ids=["q-only", "kv-only"])
def test_gradients_only_for_inputs_that_need_them(triton_device, needs):
    q, k, v, grad_out = _inputs(1, 2, 9, 21, 16, torch.float32, triton_device, seed=4)
    for t, need in zip((q, k, v), needs):
        t.requires_grad_(need)
    _assert_matches(_triton(q, k, v, grad_out), _fp32_reference(q, k, v, grad_out), torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_very_negative_scores_stay_finite(triton_device):
    """Every score near -250: exp(-logsumexp) overflows unless the key tail past Nk is masked out.

    (The interpreter warns about the inf/NaN it computes in masked-out lanes, which are never stored.)
    """
    q, k, v, grad_out = _inputs(1, 2, 9, 7, 16, torch.float32, triton_device, seed=6)
    with torch.no_grad():
        q.mul_(0.1).add_(8.0)
        k.mul_(0.1).sub_(8.0)
    _assert_matches(_triton(q, k, v, grad_out), _fp32_reference(q, k, v, grad_out), torch.float32)


def test_naive_reference_matches_sdpa():
    q, k, v, _ = _inputs(2, 3, 11, 29, 16, torch.float64, "cpu", seed=5)
    torch.testing.assert_close(attention_naive(q, k, v, 0.7), attention_sdpa(q, k, v, 0.7))


# ---- GPU: bf16 (the interpreter miscomputes bf16 dots), larger shapes, the benchmark shapes ----

BENCH_SHAPES = [(32, 6, 50, 50, 64), (32, 6, 197, 197, 64), (16, 6, 343, 343, 64), (8, 6, 1024, 1024, 64),
                (4, 12, 4096, 4096, 64), (32, 6, 64, 343, 64), (8, 6, 64, 4096, 64), (8, 6, 256, 4096, 64),
                (2, 6, 64, 32768, 64), (8, 6, 4096, 64, 64)]


def _assert_close_as_torch(q, k, v, grad_out):
    """Our error against fp32 SDPA is at most a few times torch's own SDPA error in the same dtype."""
    ours = _triton(q, k, v, grad_out)
    torch_lowp = _forward_backward(attention_sdpa, *(t.detach().requires_grad_() for t in (q, k, v)), grad_out)
    ref = _fp32_reference(q, k, v, grad_out)
    for name, a, t, r in zip(NAMES, ours, torch_lowp, ref):
        assert a.dtype == q.dtype and torch.isfinite(a).all(), name
        err, torch_err = (a.float() - r).abs().max().item(), (t.float() - r).abs().max().item()
        assert err <= 3 * torch_err + 1e-3, f"{name}: max error {err:.3g} vs torch's {torch_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("nq,nk", [(1, 1), (77, 77), (64, 1000), (1000, 64)])
def test_gpu_bf16_matches_reference(cuda_device, nq, nk, d):
    _assert_close_as_torch(*_inputs(2, 3, nq, nk, d, torch.bfloat16, cuda_device))


@pytest.mark.gpu
def test_gpu_fp16_matches_reference(cuda_device):
    _assert_close_as_torch(*_inputs(2, 4, 300, 457, 64, torch.float16, cuda_device))


@pytest.mark.gpu
def test_gpu_plans_split_cross_attention(cuda_device):
    """On a GPU the model's cross shapes take the split and atomic paths (checked above for values)."""
    from medformer_kernels.triton_attention import plan_attention

    q, k, v, _ = _inputs(8, 6, 64, 4096, 64, torch.bfloat16, cuda_device)
    plan = plan_attention(q, k, v, 0.125)
    assert plan.kv_splits > 1 and plan.dq_atomic
    q, k, v, _ = _inputs(8, 6, 4096, 64, 64, torch.bfloat16, cuda_device)
    assert plan_attention(q, k, v, 0.125).q_splits > 1


@pytest.mark.gpu
@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_bench_shapes_bf16(cuda_device, shape):
    _assert_close_as_torch(*_inputs(*shape, torch.bfloat16, cuda_device))
