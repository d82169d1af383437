"""Fused patch embedding (Triton) against the torch reference: values and gradients, 2D and 3D.

CPU: the kernels run in Triton's interpreter (tiny shapes, odd channel counts, patch sizes 2 to 8,
keep subsets, fp32 and fp16). GPU (marked): bf16 and the benchmark shapes, judged against torch's own
error in the same dtype. The reference itself is checked against Conv2d/Conv3d.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from medformer_kernels.checks import check_patch_embed
from medformer_kernels.reference import patch_embed_conv, patch_embed_reference

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
NAMES = ("out", "dx", "dweight", "dbias", "dpos")

# (x shape [B, C, *S], patch, E): odd channels, patch sizes 2..8, anisotropic patches, E not a block multiple.
CASES = [
    ((2, 1, 8, 8), 2, 24),
    ((1, 3, 12, 10), (4, 5), 33),
    ((2, 5, 6, 6), 3, 16),
    ((1, 3, 16, 16), 8, 20),
    ((2, 3, 14, 21), 7, 17),
    ((2, 1, 8, 8, 8), 4, 24),
    ((1, 3, 6, 4, 10), (3, 2, 5), 33),
    ((1, 5, 8, 6, 4), 2, 16),
    ((1, 1, 8, 16, 8), (8, 4, 2), 20),
    ((1, 1, 6, 12, 6), 6, 17),
]


def _case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _inputs(shape, patch, e, dtype, device, bias=True, pos=True, keep=None, x_grad=True, seed=0):
    """(x, weight, bias, pos, keep, grad_out); keep is None, 'subset' (a third, shuffled) or 'repeat'."""
    gen = torch.Generator().manual_seed(seed)
    b, c, *spatial = shape
    sizes = (patch,) * len(spatial) if isinstance(patch, int) else patch
    n = math.prod(s // p for s, p in zip(spatial, sizes))

    def make(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    x = make(*shape).requires_grad_(x_grad)
    weight = make(e, c, *sizes, scale=(c * math.prod(sizes)) ** -0.5)
    keep_idx = None
    if keep == "subset":
        keep_idx = torch.rand(b, n, generator=gen).argsort(1)[:, : max(1, n // 3)].to(device)
    elif keep == "repeat":
        keep_idx = torch.randint(0, n, (b, n + 3), generator=gen).to(device)
    tokens = n if keep_idx is None else keep_idx.shape[1]
    grad_out = torch.randn(b, tokens, e, generator=gen).to(device=device, dtype=dtype)
    return x, weight, make(e) if bias else None, make(n, e) if pos else None, keep_idx, grad_out


def _forward_backward(fn, x, weight, bias, pos, keep, grad_out):
    """(out, dx, dweight, dbias, dpos); None for an input that is absent or does not require grad."""
    out = fn(x, weight, bias, pos, keep)
    inputs = (x, weight, bias, pos)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return (out, *(next(grads) if t is not None and t.requires_grad else None for t in inputs))


def _triton(patch):
    from medformer_kernels.triton_patch_embed import patch_embed_triton

    def run(x, weight, bias, pos, keep):
        return patch_embed_triton(x, weight, bias, pos, check_patch_embed(x, weight, bias, pos, patch, keep), keep)

    return run


def _fp32_reference(patch, x, weight, bias, pos, keep, grad_out):
    sizes = check_patch_embed(x, weight, bias, pos, patch, keep).sizes
    leaves = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in (x, weight, bias, pos)]
    return _forward_backward(lambda *a: patch_embed_reference(*a[:4], sizes, a[4]), *leaves, keep, grad_out.float())


def _assert_matches(ours, ref, dtype):
    for name, a, b in zip(NAMES, ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def _check(shape, patch, e, dtype, device, **options):
    args = _inputs(shape, patch, e, dtype, device, **options)
    _assert_matches(_forward_backward(_triton(patch), *args), _fp32_reference(patch, *args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("keep", [None, "subset"])
@pytest.mark.parametrize("shape,patch,e", CASES, ids=_case_id)
def test_matches_reference(triton_device, shape, patch, e, keep, dtype):
    _check(shape, patch, e, dtype, triton_device, keep=keep)


@pytest.mark.parametrize("bias,pos", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("keep", [None, "subset"])
def test_without_bias_or_pos(triton_device, bias, pos, keep):
    _check((2, 3, 8, 12), (2, 3), 20, torch.float32, triton_device, bias=bias, pos=pos, keep=keep)


def test_repeated_keep_indices_accumulate_gradients(triton_device):
    """A patch kept twice contributes twice to dx, dweight and dpos."""
    _check((2, 3, 4, 4, 4), 2, 16, torch.float32, triton_device, keep="repeat")


def test_input_without_grad(triton_device):
    _check((2, 1, 8, 8, 8), 4, 24, torch.float32, triton_device, keep="subset", x_grad=False)


def test_strided_input(triton_device):
    """x a channels-last view: the kernel reads it through its strides."""
    x, weight, bias, pos, keep, grad_out = _inputs((2, 3, 8, 12), 4, 16, torch.float32, triton_device)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    args = (x, weight, bias, pos, keep, grad_out)
    _assert_matches(_forward_backward(_triton(4), *args), _fp32_reference(4, *args), torch.float32)


@pytest.mark.parametrize("shape,patch,e", CASES, ids=_case_id)
def test_reference_matches_conv(shape, patch, e):
    x, weight, bias, pos, _, _ = _inputs(shape, patch, e, torch.float32, "cpu")
    sizes = check_patch_embed(x, weight, bias, pos, patch, None).sizes
    torch.testing.assert_close(patch_embed_reference(x, weight, bias, pos, sizes),
                               patch_embed_conv(x, weight, bias, pos, sizes))


def test_patch_order_is_conv_order():
    """Token n is the Conv output at grid position n (row-major), the order `pos` and `keep` use."""
    x = torch.randn(1, 2, 4, 6, 8)
    weight = torch.randn(5, 2, 2, 3, 4)
    conv = F.conv3d(x, weight, stride=(2, 3, 4))[0]  # [E, 2, 2, 2]
    tokens = patch_embed_reference(x, weight, None, None, (2, 3, 4))[0]  # [N, E]
    torch.testing.assert_close(tokens[1 * 4 + 0 * 2 + 1], conv[:, 1, 0, 1])


# ---- GPU: bf16 (the interpreter miscomputes bf16 dots) and the benchmark shapes ----

BENCH_SHAPES = [((8, 1, 64, 64, 64), 4, 384), ((32, 1, 28, 28, 28), 4, 384), ((128, 3, 224, 224), 16, 384)]


def _assert_close_as_torch(patch, args):
    """Our error against the fp32 reference is at most a few times the reference's own in the same dtype."""
    ours = _forward_backward(_triton(patch), *args)
    sizes = check_patch_embed(*args[:4], patch, args[4]).sizes
    lowp_leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in args[:4]]
    torch_lowp = _forward_backward(lambda *a: patch_embed_reference(*a[:4], sizes, a[4]), *lowp_leaves, *args[4:])
    ref = _fp32_reference(patch, *args)
    for name, a, t, r in zip(NAMES, ours, torch_lowp, ref):
        if r is None:
            continue
        assert a.dtype == args[0].dtype and torch.isfinite(a).all(), name
        err, torch_err = (a.float() - r).abs().max().item(), (t.float() - r).abs().max().item()
        bound = 3 * torch_err + 1e-3 * r.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} vs torch's {torch_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [None, "subset"])
@pytest.mark.parametrize("shape,patch,e", [CASES[1], CASES[5], CASES[6]], ids=_case_id)
def test_gpu_bf16_matches_reference(cuda_device, shape, patch, e, keep):
    _assert_close_as_torch(patch, _inputs(shape, patch, e, torch.bfloat16, cuda_device, keep=keep))


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [None, "subset"])
@pytest.mark.parametrize("shape,patch,e", BENCH_SHAPES, ids=_case_id)
def test_gpu_bench_shapes_bf16(cuda_device, shape, patch, e, keep):
    _assert_close_as_torch(patch, _inputs(shape, patch, e, torch.bfloat16, cuda_device, keep=keep, x_grad=False))
