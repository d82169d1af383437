"""Kernel tests: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates, so it is set here, before any kernel module
loads. On a CUDA machine it is left alone and the kernels compile for the GPU.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def triton_device() -> torch.device:
    """Where the Triton kernels run here: the CPU under the interpreter, else the GPU; skips if neither."""
    pytest.importorskip("triton")
    from medformer_kernels.backend import interpret_enabled

    if interpret_enabled():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")


@pytest.fixture
def cuda_device() -> torch.device:
    """A GPU with compiled (not interpreted) Triton kernels, for the bf16 and full-size tests."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    from medformer_kernels.backend import interpret_enabled

    if interpret_enabled():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests need compiled kernels (the interpreter miscomputes bf16)")
    return torch.device("cuda")
