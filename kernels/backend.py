"""Which backend runs a kernel call: Triton or the torch reference (read from the environment per call)."""

import functools
import os

import torch

from medformer_core.api.errors import UsageError

BACKEND_ENV = "MEDFORMER_KERNELS"
BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (Triton is an optional extra: `pip install 'medformer[triton]'`)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpret_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`), as Triton itself reads it."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend asked for in `MEDFORMER_KERNELS`: auto (the default), triton or torch."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise UsageError(
            f"{BACKEND_ENV}={value!r} is not a kernel backend",
            hint=f"use one of {', '.join(BACKENDS)}, or unset it",
        )
    return value


GPU_DTYPES = (torch.float16, torch.bfloat16)


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for a call on `tensor`: fp16/bf16 CUDA tensors use Triton when installed;
    CPU and fp32 tensors use torch (SDPA's fp32 GPU kernels are exact where Triton's fp32 dots would
    spill registers; training runs under bf16 autocast, so it takes the kernels).

    Raises UsageError when `MEDFORMER_KERNELS=triton` forces Triton where it cannot run.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "auto":
        use = tensor.is_cuda and tensor.dtype in GPU_DTYPES and triton_available()
        return "triton" if use else "torch"
    if not triton_available():
        raise UsageError(
            f"{BACKEND_ENV}=triton, but Triton cannot be imported",
            hint="install it with `pip install 'medformer[triton]'`, or unset " + BACKEND_ENV,
        )
    if not tensor.is_cuda and not interpret_enabled():
        raise UsageError(
            f"{BACKEND_ENV}=triton, but the tensors are on {tensor.device.type} and Triton kernels run on CUDA",
            hint=f"move the tensors to a CUDA device, unset {BACKEND_ENV}, or (tests only, slow) set "
            "TRITON_INTERPRET=1 before the first Triton call",
        )
    if tensor.is_cuda and tensor.dtype not in GPU_DTYPES:
        raise UsageError(
            f"{BACKEND_ENV}=triton, but the tensors are {str(tensor.dtype).removeprefix('torch.')} and the GPU "
            "kernels take float16 or bfloat16",
            hint=f"run under torch.autocast (as `medformer train` does), cast to bfloat16, or unset {BACKEND_ENV} "
            "to run float32 with torch",
        )
    return "triton"


def require_built_for(tensor: torch.Tensor, interpreted: bool) -> None:
    """Raise when the Triton kernels were built for the other kind of device than `tensor` is on.

    TRITON_INTERPRET is read when the kernels load: CPU tensors need interpreted kernels, and CUDA
    tensors compiled ones (the interpreter would run on the host, and miscomputes bf16).
    """
    if not tensor.is_cuda and not interpreted:
        raise UsageError(
            "Triton kernels were built before TRITON_INTERPRET=1 was set, so they cannot run on CPU tensors",
            hint="set TRITON_INTERPRET=1 before the first Triton call in the process",
        )
    if tensor.is_cuda and interpreted:
        raise UsageError(
            "Triton kernels were built for the CPU interpreter (TRITON_INTERPRET=1), not for the GPU",
            hint="unset TRITON_INTERPRET to run them on CUDA tensors",
        )
