"""The public dispatch: which backend runs, forcing it with MEDFORMER_KERNELS, and the clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import medformer_kernels
from medformer_core.api.errors import UsageError
from medformer_kernels import attention, backend, dispatch, patch_embed
from medformer_kernels.checks import KernelArgumentError


def _attention_args(nq=5, nk=5, d=16):
    return torch.randn(1, 2, nq, d), torch.randn(1, 2, nk, d), torch.randn(1, 2, nk, d)


def _patch_args():
    """x [1, 3, 8, 8] in 2x2 patches (N=16), weight [8, 3, 2, 2], bias [8], pos [16, 8]."""
    return torch.randn(1, 3, 8, 8), torch.randn(8, 3, 2, 2), torch.randn(8), torch.randn(16, 8)


@pytest.fixture
def spies(monkeypatch):
    """Record which implementation each public call reached: {'torch': n, 'triton': n}."""
    pytest.importorskip("triton")
    from medformer_kernels import triton_attention, triton_patch_embed

    calls = {"torch": 0, "triton": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(dispatch, "attention_sdpa", spy("torch", dispatch.attention_sdpa))
    monkeypatch.setattr(dispatch, "patch_embed_reference", spy("torch", dispatch.patch_embed_reference))
    monkeypatch.setattr(triton_attention, "attention_triton", spy("triton", triton_attention.attention_triton))
    monkeypatch.setattr(triton_patch_embed, "patch_embed_triton", spy("triton", triton_patch_embed.patch_embed_triton))
    return calls


def test_cpu_tensors_use_torch_by_default(monkeypatch, spies):
    monkeypatch.delenv("MEDFORMER_KERNELS", raising=False)
    attention(*_attention_args())
    patch_embed(*_patch_args(), patch=2)
    assert spies == {"torch": 2, "triton": 0}


@pytest.mark.parametrize("value,expected",
                         [("torch", "torch"), ("TORCH", "torch"), ("triton", "triton"), ("auto", "torch")])
def test_env_forces_a_backend_at_call_time(monkeypatch, spies, triton_device, value, expected):
    if triton_device.type != "cpu":
        pytest.skip("checks forcing Triton onto CPU tensors, which needs the interpreter")
    monkeypatch.setenv("MEDFORMER_KERNELS", value)
    q, k, v = _attention_args()
    out = attention(q, k, v)
    tokens = patch_embed(*_patch_args(), patch=2, keep=torch.tensor([[0, 5, 15]]))
    assert spies[expected] == 2 and sum(spies.values()) == 2
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert tokens.shape == (1, 3, 8)


def test_forcing_triton_on_cpu_without_interpreter_is_a_usage_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("MEDFORMER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="Triton kernels run on CUDA") as info:
        attention(*_attention_args())
    assert "TRITON_INTERPRET=1" in info.value.hint
    with pytest.raises(UsageError, match="Triton kernels run on CUDA"):
        patch_embed(*_patch_args(), patch=2)


def test_forcing_triton_when_it_is_not_installed_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("MEDFORMER_KERNELS", "triton")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(UsageError, match="Triton cannot be imported") as info:
        attention(*_attention_args())
    assert "medformer[triton]" in info.value.hint


def test_kernels_built_before_the_interpreter_was_enabled(monkeypatch, triton_device):
    from medformer_kernels import triton_attention

    monkeypatch.setenv("MEDFORMER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_attention, "INTERPRETED", False)
    with pytest.raises(UsageError, match="built before TRITON_INTERPRET=1"):
        attention(*_attention_args())


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("MEDFORMER_KERNELS", "cuda")
    with pytest.raises(UsageError, match="MEDFORMER_KERNELS='cuda'"):
        attention(*_attention_args())


def test_import_needs_no_triton():
    """With triton unimportable: importing works, CPU calls use torch, forcing Triton says how to install it."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import os, torch, medformer_kernels
from medformer_core.api.errors import UsageError
q = torch.randn(1, 1, 3, 16)
assert medformer_kernels.attention(q, q, q).shape == (1, 1, 3, 16)
assert medformer_kernels.patch_embed(torch.randn(1, 1, 4, 4), torch.randn(8, 1, 2, 2), None, None, 2).shape == (1, 4, 8)
os.environ["MEDFORMER_KERNELS"] = "triton"
try:
    medformer_kernels.attention(q, q, q)
except UsageError as exc:
    print(exc)
"""
    env = {k: v for k, v in os.environ.items() if k != "MEDFORMER_KERNELS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Triton cannot be imported" in result.stdout and "pip install" in result.stdout


def test_importing_the_package_does_not_import_triton():
    result = subprocess.run([sys.executable, "-c", "import sys, medformer_kernels; print('triton' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_public_api():
    assert medformer_kernels.__all__ == ["attention", "patch_embed"]
    assert callable(medformer_kernels.attention) and callable(medformer_kernels.patch_embed)


# ---- invalid arguments: one clear error each, on every backend ----

def _attention_case(name):
    q, k, v = _attention_args()
    cases = {
        "3-D q": ((q[0], k, v), "q must be 4-D"),
        "batch mismatch": ((q, torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)), "must agree on B, H and d"),
        "head dim mismatch": ((q, torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)), "must agree on B, H and d"),
        "k v lengths differ": ((q, k, torch.randn(1, 2, 6, 16)), "same shape"),
        "head dim 48": ((torch.randn(1, 2, 5, 48),) * 3, "head dim 48 is not supported"),
        "integer dtype": ((q.long(), k.long(), v.long()), "dtype torch.int64"),
        "mixed dtypes": ((q, k.half(), v), "dtype torch.float16 but the input has torch.float32"),
        "empty": ((torch.randn(1, 2, 0, 16), k, v), "is empty"),
        "not a tensor": (([1.0], k, v), "must be a torch.Tensor"),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["3-D q", "batch mismatch", "head dim mismatch", "k v lengths differ", "head dim 48",
                                  "integer dtype", "mixed dtypes", "empty", "not a tensor"])
def test_attention_invalid_arguments(case):
    args, message = _attention_case(case)
    with pytest.raises(KernelArgumentError, match=message):
        attention(*args)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "0.1"])
def test_attention_invalid_scale(scale):
    with pytest.raises(KernelArgumentError, match="scale must be a positive finite number"):
        attention(*_attention_args(), scale=scale)


def _patch_case(name):
    x, w, b, pos = _patch_args()
    cases = {
        "patch not dividing": ((torch.randn(1, 3, 9, 8), w, b, None, 2, None), "does not divide input size"),
        "linear weight layout": ((x, w.reshape(8, 12), b, pos, 2, None), "Conv layout"),
        "weight channels": ((x, torch.randn(8, 1, 2, 2), b, pos, 2, None), "does not match the Conv layout"),
        "weight patch": ((x, torch.randn(8, 3, 4, 4), b, pos, 2, None), "does not match the Conv layout"),
        "bias size": ((x, w, torch.randn(7), pos, 2, None), "bias has 7 entries"),
        "pos shape": ((x, w, b, torch.randn(15, 8), 2, None), r"pos \(15, 8\) must be \[N, E\]"),
        "keep out of range": ((x, w, b, pos, 2, torch.tensor([[0, 16]])), "indices outside"),
        "keep negative": ((x, w, b, pos, 2, torch.tensor([[-1]])), "indices outside"),
        "keep float": ((x, w, b, pos, 2, torch.tensor([[0.0]])), "keep has dtype"),
        "keep batch": ((x, w, b, pos, 2, torch.tensor([[0], [1]])), "must be \\[B=1, n_keep\\]"),
        "3-D x": ((x[0], w, b, pos, 2, None), "x must be"),
        "patch tuple length": ((x, w, b, pos, (2, 2, 2), None), "tuple of 2 positive ints"),
        "patch zero": ((x, w, b, pos, 0, None), "positive int"),
        "dtype mismatch": ((x, w.half(), b, pos, 2, None), "weight has dtype torch.float16"),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["patch not dividing", "linear weight layout", "weight channels", "weight patch",
                                  "bias size", "pos shape", "keep out of range", "keep negative", "keep float",
                                  "keep batch", "3-D x", "patch tuple length", "patch zero", "dtype mismatch"])
def test_patch_embed_invalid_arguments(case):
    (x, w, b, pos, patch, keep), message = _patch_case(case)
    with pytest.raises(KernelArgumentError, match=message):
        patch_embed(x, w, b, pos, patch, keep)


def test_argument_errors_are_usage_errors_with_hints():
    """A CLI prints them as one line; plain Python code can catch them as ValueError."""
    with pytest.raises(ValueError) as info:
        patch_embed(torch.randn(1, 3, 9, 8), torch.randn(8, 3, 2, 2), None, None, 2)
    assert isinstance(info.value, UsageError)
    assert "pad the input" in str(info.value)


def test_interpreted_kernels_refuse_cuda_tensors():
    """Kernels built for the interpreter would run on the host (and miscompute bf16): a clear error instead."""

    class CudaTensor:
        is_cuda = True

    with pytest.raises(UsageError, match="built for the CPU interpreter"):
        backend.require_built_for(CudaTensor(), interpreted=True)
    backend.require_built_for(CudaTensor(), interpreted=False)


@pytest.mark.gpu
def test_gpu_keep_values_are_read_only_in_debug_mode(monkeypatch):
    """Reading keep's values would wait for the GPU on every call, so only MEDFORMER_KERNELS_DEBUG=1 does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from medformer_kernels.checks import DEBUG_ENV, check_patch_embed

    x, w, b, pos = (t.cuda() for t in _patch_args())
    keep = torch.tensor([[0, 16]], device="cuda")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    check_patch_embed(x, w, b, pos, 2, keep)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(KernelArgumentError, match="indices outside"):
        check_patch_embed(x, w, b, pos, 2, keep)


def test_fp32_cuda_tensors_use_torch_and_forcing_triton_says_why(monkeypatch):
    """The GPU kernels take fp16/bf16; fp32 CUDA calls go to torch, and forcing Triton names the fix."""

    class CudaTensor:
        is_cuda = True
        dtype = torch.float32
        device = torch.device("cuda")

    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.backend_for(CudaTensor()) == "torch"
    half = CudaTensor()
    half.dtype = torch.bfloat16
    assert backend.backend_for(half) == "triton"
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    with pytest.raises(UsageError, match="take float16 or bfloat16") as info:
        backend.backend_for(CudaTensor())
    assert "autocast" in info.value.hint


@pytest.mark.gpu
def test_gpu_autocast_runs_the_kernels_in_bf16(spies, monkeypatch):
    """fp32 parameters and images under bf16 autocast (a training step) reach Triton, as bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    x, w, b, pos = (t.cuda().requires_grad_() for t in _patch_args())
    q, k, v = (t.cuda() for t in _attention_args())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = patch_embed(x, w, b, pos, 2)
        out = attention(q, k, v)
    assert tokens.dtype == out.dtype == torch.bfloat16
    assert spies == {"torch": 0, "triton": 2}
    tokens.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
