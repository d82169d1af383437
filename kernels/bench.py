"""Benchmarks: the fused kernels against torch baselines on the same inputs (ms, TFLOP/s, GB/s, speedup).

Timing: the median of repeated calls after warm-up, as many as fit a time budget: Triton's
`do_bench` on CUDA (CUDA events, the L2 cache flushed before each call), torch's benchmark `Timer`
elsewhere.
"Forward" runs under no_grad; "forward+backward" also takes the gradients of every input that
requires grad, for a fixed output gradient. On CPU the Triton kernels cannot run (the interpreter
is for tests), so "medformer" is the torch reference the dispatch uses there.
"""

import contextlib
import functools
import math
import platform
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.benchmark

from medformer_core.api.errors import UsageError
from medformer_kernels.backend import interpret_enabled, triton_available
from medformer_kernels.checks import check_patch_embed
from medformer_kernels.reference import (
    attention_naive,
    attention_sdpa,
    patch_embed_all_then_gather,
    patch_embed_conv,
    patch_embed_reference,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The model's shapes: self attention BxHxNxd; cross attention BxHxNqxNkxd (64 and 256 latents over
# 343, 4,096 and 32,768 tokens, and 4,096 queries back over 64 latents).
ATTENTION_SHAPES = ("32x6x50x64,32x6x197x64,16x6x343x64,8x6x1024x64,4x12x4096x64,"
                    "32x6x64x343x64,8x6x64x4096x64,8x6x256x4096x64,2x6x64x32768x64,2x6x256x32768x64,"
                    "8x6x4096x64x64")
ATTENTION_QUICK = "8x6x50x64,4x6x197x64,8x6x64x343x64"
# BxCx<spatial>:patch:E
PATCH_SHAPES = "8x1x64x64x64:4:384,32x1x28x28x28:4:384,128x3x224x224:16:384"
PATCH_QUICK = "2x1x64x64x64:4:384,8x1x28x28x28:4:384,8x3x224x224:16:384"


@dataclass(frozen=True)
class AttentionShape:
    b: int
    h: int
    nq: int
    nk: int
    d: int

    def label(self) -> str:
        lengths = f"N={self.nq}" if self.nq == self.nk else f"Nq={self.nq} Nk={self.nk}"
        return f"B={self.b} H={self.h} {lengths} d={self.d}"

    def flops(self) -> int:
        """Forward FLOPs: two matmuls of 2*B*H*Nq*Nk*d each."""
        return 4 * self.b * self.h * self.nq * self.nk * self.d


@dataclass(frozen=True)
class PatchShape:
    b: int
    c: int
    spatial: tuple[int, ...]
    patch: tuple[int, ...]
    e: int

    @property
    def n_patches(self) -> int:
        return math.prod(s // p for s, p in zip(self.spatial, self.patch))

    @property
    def k(self) -> int:
        return self.c * math.prod(self.patch)

    def label(self) -> str:
        dims = "x".join(map(str, self.spatial))
        return f"{self.b}x{self.c}x{dims} patch {'x'.join(map(str, self.patch))} E={self.e}"


@dataclass
class BenchResult:
    """What a benchmark run measured: one row per (shape, implementation), a summary per shape."""

    op: str
    meta: dict
    notes: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _items(text: str) -> list[str]:
    return [item for item in re.split(r"[,;\s]+", text.strip()) if item]


def _ints(text: str, what: str, example: str) -> list[int]:
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{what} {text!r} is not a list of positive sizes joined by 'x'", hint=f"e.g. {example}")
    return values


def parse_attention_shapes(text: str) -> list[AttentionShape]:
    """'32x6x197x64,8x6x64x4096x64' -> shapes: BxHxNxd (self) or BxHxNqxNkxd (cross)."""
    example = "--shapes 32x6x197x64,8x6x64x4096x64"
    shapes = []
    for item in _items(text):
        sizes = _ints(item, "attention shape", example)
        if len(sizes) == 4:
            shapes.append(AttentionShape(sizes[0], sizes[1], sizes[2], sizes[2], sizes[3]))
        elif len(sizes) == 5:
            shapes.append(AttentionShape(*sizes))
        else:
            raise UsageError(f"attention shape {item!r} needs BxHxNxd or BxHxNqxNkxd", hint=f"e.g. {example}")
    if not shapes:
        raise UsageError("no attention shapes given", hint=f"e.g. {example}")
    return shapes


def parse_patch_shapes(text: str) -> list[PatchShape]:
    """'8x1x64x64x64:4:384,128x3x224x224:16:384' -> shapes BxCx<spatial>:patch:E; patch is P or PxPxP."""
    example = "--shapes 8x1x64x64x64:4:384,128x3x224x224:16:384"
    shapes = []
    for item in _items(text):
        parts = item.split(":")
        if len(parts) != 3:
            raise UsageError(f"patch-embed shape {item!r} needs BxCx<spatial>:patch:E", hint=f"e.g. {example}")
        dims, patch, e = (_ints(part, "patch-embed shape", example) for part in parts)
        spatial = tuple(dims[2:])
        patch = tuple(patch * len(spatial)) if len(patch) == 1 else tuple(patch)
        if len(dims) not in (4, 5) or len(patch) != len(spatial) or len(e) != 1:
            raise UsageError(f"patch-embed shape {item!r}: 2 or 3 spatial sizes, a patch per axis, one E",
                             hint=f"e.g. {example}")
        if any(s % p for s, p in zip(spatial, patch)):
            raise UsageError(f"patch-embed shape {item!r}: patch {patch} does not divide {spatial}")
        shapes.append(PatchShape(dims[0], dims[1], spatial, patch, e[0]))
    if not shapes:
        raise UsageError("no patch-embed shapes given", hint=f"e.g. {example}")
    return shapes


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device", hint="use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not benchmarked", hint="use auto, cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint=f"use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median milliseconds of fn() after warm-up, its repeats filling about budget_s: Triton's
    do_bench on CUDA (CUDA events, L2 cache flushed before each call), else torch's benchmark Timer."""
    if device.type == "cuda" and triton_available():
        from triton.testing import do_bench

        with torch.cuda.device(device):
            return do_bench(fn, warmup=budget_s * 250, rep=budget_s * 1e3, return_mode="median")
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=budget_s).median * 1e3


@dataclass
class _Impl:
    name: str  # row label
    group: str  # "medformer", or the baseline family the summary compares against
    forward: Callable[[], torch.Tensor]
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # held while timing


def _measure(impl: _Impl, params: list[torch.Tensor], device, budget_s) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one implementation."""
    out = impl.forward()
    grad_out = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            impl.forward()

    def fwd_bwd():
        torch.autograd.grad(impl.forward(), params, grad_out)

    fwd_bwd()  # fails fast (unsupported backend, out of memory) before any timing
    return time_ms(fwd, device, budget_s), time_ms(fwd_bwd, device, budget_s)


def _row(op, label, params, impl, fwd_ms, fwdbwd_ms, flops, nbytes) -> dict:
    """One result row; `flops`/`nbytes` are (forward, forward+backward) counts."""
    row = {"op": op, "shape": label, "params": params, "impl": impl.name, "group": impl.group,
           "fwd_ms": fwd_ms, "fwd_tflops": flops[0] / fwd_ms / 1e9, "fwdbwd_ms": fwdbwd_ms,
           "fwdbwd_tflops": flops[1] / fwdbwd_ms / 1e9}
    if nbytes is not None:
        row["fwd_gbps"] = nbytes[0] / fwd_ms / 1e6
        row["fwdbwd_gbps"] = nbytes[1] / fwdbwd_ms / 1e6
    return row


ShapeDone = Callable[[str, list[dict]], None]  # called with (shape label, its rows) as each shape finishes


def _bench_shape(result, op, label, params, impls, grads, device, budget_s, flops, nbytes=None,
                 on_shape: ShapeDone | None = None) -> None:
    """Time each implementation on one shape; add rows with speedups (baseline ms / medformer ms)."""
    rows = []
    for impl in impls:
        try:
            with impl.setting():
                fwd_ms, fwdbwd_ms = _measure(impl, grads, device, budget_s)
        except (RuntimeError, NotImplementedError) as exc:
            if impl.group == "medformer":
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            result.notes.append(f"{label}: {impl.name} skipped ({first_line[:120]})")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(_row(op, label, params, impl, fwd_ms, fwdbwd_ms, flops, nbytes))
    ours = rows[0]
    for row in rows:
        row["fwd_speedup"] = row["fwd_ms"] / ours["fwd_ms"]
        row["fwdbwd_speedup"] = row["fwdbwd_ms"] / ours["fwdbwd_ms"]
    result.rows.extend(rows)
    summary = {"shape": label, "vs": {}}
    for group in dict.fromkeys(row["group"] for row in rows[1:]):
        best = min((row for row in rows if row["group"] == group), key=lambda row: row["fwdbwd_ms"])
        summary["vs"][group] = {"fwd": best["fwd_speedup"], "fwdbwd": best["fwdbwd_speedup"], "best": best["impl"]}
    result.summary.append(summary)
    if on_shape is not None:
        on_shape(label, rows)


def geomeans(result: BenchResult) -> dict[str, dict[str, float]]:
    """Geometric mean of the speedups against each baseline group, over the shapes where it ran."""
    means = {}
    for group in dict.fromkeys(group for entry in result.summary for group in entry["vs"]):
        values = [entry["vs"][group] for entry in result.summary if group in entry["vs"]]
        means[group] = {kind: math.exp(statistics.fmean(math.log(v[kind]) for v in values))
                        for kind in ("fwd", "fwdbwd")}
    return means


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(op: str, device: torch.device, dtype: torch.dtype, budget_s: float) -> dict:
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {"op": op, "device": str(device), "device_name": device_name(device), "dtype": dtype_name(dtype),
            "torch": torch.__version__, "triton": triton_version, "cpu_threads": torch.get_num_threads(),
            "budget_s": budget_s}


def _use_triton(device: torch.device, dtype: torch.dtype, result: BenchResult) -> bool:
    """Whether the Triton kernels are timed here; notes why not on CPU or in fp32."""
    if device.type == "cuda" and dtype == torch.float32:
        result.notes.append("fp32: the dispatch runs fp32 CUDA tensors with torch (the GPU kernels take fp16 "
                            "and bf16), so 'medformer' is the torch reference.")
        return False
    if device.type != "cuda":
        result.notes.append("CPU: the Triton kernels need a GPU (the interpreter is for tests, not timing), so "
                            "'medformer' is the torch reference that the dispatch runs on CPU tensors.")
        return False
    if not triton_available():
        result.notes.append("Triton is not installed: 'medformer' is the torch reference.")
        return False
    if interpret_enabled():
        raise UsageError("TRITON_INTERPRET=1 is set: the kernels would run in the CPU interpreter",
                         hint="unset TRITON_INTERPRET to benchmark on the GPU")
    return True


def _sdpa_impls(device: torch.device, q, k, v) -> list[_Impl]:
    """torch SDPA pinned to each backend torch may pick on this device, each its own baseline (the
    targets name the flash backend); unsupported ones are skipped later.

    The backend is pinned around the whole measurement, so its setting costs nothing per call.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    else:
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)]

    return [_Impl(f"torch SDPA ({name})", f"torch SDPA ({name})", lambda: attention_sdpa(q, k, v),
                  functools.partial(sdpa_kernel, backend)) for name, backend in backends]


def bench_attention(shapes: list[AttentionShape], dtype: torch.dtype, device: torch.device,
                    budget_s: float, on_shape: ShapeDone | None = None) -> BenchResult:
    """Fused attention vs torch SDPA (each backend) and naive attention, forward and forward+backward."""
    result = BenchResult("attention", _meta("attention", device, dtype, budget_s))
    use_triton = _use_triton(device, dtype, result)
    if use_triton:
        from medformer_kernels.triton_attention import attention_triton as ours
    else:
        ours = attention_sdpa
    for shape in shapes:
        q = torch.randn(shape.b, shape.h, shape.nq, shape.d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(shape.b, shape.h, shape.nk, shape.d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(shape.b, shape.h, shape.nk, shape.d, device=device, dtype=dtype, requires_grad=True)
        # q, k, v bound as defaults: they are deleted at the end of each shape, so no late lookup.
        impls = [_Impl(f"medformer ({'triton' if use_triton else 'torch'})", "medformer",
                       lambda q=q, k=k, v=v: ours(q, k, v)),
                 *_sdpa_impls(device, q, k, v),
                 _Impl("naive softmax(QK^T)V", "naive", lambda q=q, k=k, v=v: attention_naive(q, k, v))]
        flops = (shape.flops(), int(3.5 * shape.flops()))  # backward: 2.5x forward (5 matmuls vs 2)
        _bench_shape(result, "attention", shape.label(), asdict(shape), impls, [q, k, v], device, budget_s, flops,
                     on_shape=on_shape)
        del q, k, v, impls
    return result


def _patch_bytes(shape: PatchShape, n_tok: int, itemsize: int) -> tuple[int, int]:
    """Least traffic (each input read once, each output written once), forward and forward+backward."""
    m = shape.b * n_tok
    params = shape.e * shape.k + shape.e + shape.n_patches * shape.e  # weight, bias, pos
    fwd = m * shape.k + params + m * shape.e  # patches read, tokens written
    bwd = m * shape.e + m * shape.k + params  # dOut and patches read, dweight, dbias, dpos written
    return fwd * itemsize, (fwd + bwd) * itemsize


def bench_patch_embed(shapes: list[PatchShape], dtype: torch.dtype, device: torch.device, budget_s: float,
                      keep_fraction: float, on_shape: ShapeDone | None = None) -> BenchResult:
    """Fused patch embedding vs Conv (kernel = stride), reshape+linear+add and, with keep, embed-all-then-gather."""
    result = BenchResult("patch-embed", _meta("patch-embed", device, dtype, budget_s))
    result.meta["keep_fraction"] = keep_fraction
    use_triton = _use_triton(device, dtype, result)
    if use_triton:
        from medformer_kernels.triton_patch_embed import patch_embed_triton
    for shape in shapes:
        x = torch.randn(shape.b, shape.c, *shape.spatial, device=device, dtype=dtype)
        weight = (torch.randn(shape.e, shape.c, *shape.patch, device=device) * shape.k ** -0.5).to(dtype)
        bias = torch.zeros(shape.e, device=device, dtype=dtype)
        pos = torch.randn(shape.n_patches, shape.e, device=device, dtype=dtype) * 0.02
        params = [t.requires_grad_() for t in (weight, bias, pos)]
        keeps = [None]
        if keep_fraction > 0:
            n_keep = max(1, round(shape.n_patches * keep_fraction))
            keeps.append(torch.rand(shape.b, shape.n_patches, device=device).argsort(1)[:, :n_keep])
        for keep in keeps:
            geo = check_patch_embed(x, weight, bias, pos, shape.patch, keep)
            args = (x, weight, bias, pos, shape.patch)
            if use_triton:
                impls = [_Impl("medformer (triton)", "medformer",
                               lambda keep=keep, geo=geo, x=x, weight=weight, bias=bias, pos=pos:
                               patch_embed_triton(x, weight, bias, pos, geo, keep))]
            else:
                impls = [_Impl("medformer (torch)", "medformer", lambda keep=keep: patch_embed_reference(*args, keep))]
            conv = "nn.Conv (kernel=stride)" + ("" if keep is None else " then gather")
            impls.append(_Impl(conv, "nn.Conv", lambda keep=keep: patch_embed_conv(*args, keep)))
            linear = "reshape+linear+add" if keep is None else "reshape+gather+linear+add"
            impls.append(_Impl(linear, "reshape+linear+add", lambda keep=keep: patch_embed_reference(*args, keep)))
            if keep is not None:
                impls.append(_Impl("embed-all-then-gather", "embed-all-then-gather",
                                   lambda keep=keep: patch_embed_all_then_gather(*args, keep)))
            n_tok = shape.n_patches if keep is None else keep.shape[1]
            flops = 2 * shape.b * n_tok * shape.k * shape.e
            label = shape.label() + ("" if keep is None else f" keep {n_tok}/{shape.n_patches}")
            info = {**asdict(shape), "n_tokens": n_tok}
            _bench_shape(result, "patch-embed", label, info, impls, params, device, budget_s,
                         (flops, 2 * flops), _patch_bytes(shape, n_tok, x.element_size()), on_shape)
        del x, weight, bias, pos, params, keeps
    return result
