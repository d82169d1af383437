"""Compile every shipped kernel config ahead of time for a GPU architecture, with no GPU: registers,
spills, shared memory and tensor-core instructions (wgmma, mma.sync) per config.

    python -m medformer_kernels.compile_report                 # sm_90 (H100/H200), a table
    python -m medformer_kernels.compile_report --json report.json --arch 90 --jobs 2

Each launch variant the dispatch can make (dtype, head dim, split/atomic paths, keep or not) is
compiled with Triton's bundled ptxas for `GPUTarget("cuda", arch, 32)`, specialised as a real launch
is (pointers and row strides 16-aligned, unit strides constant). Register use and stack come from
`cuobjdump -res-usage`, spill stores from the SASS (`STL`). Exit status 1 when any config spills or
fails to compile. Needs Triton, not a GPU; TRITON_INTERPRET must be unset.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medformer_kernels.configs import LaunchConfig

# The GPU kernels take fp16 and bf16 (fp32 CUDA tensors run the torch reference); fp16 compiles to the
# same tiles and instructions as bf16 (both 16-bit MMA operands), so bf16 stands for both.
TRITON_TYPES = {torch.bfloat16: "bf16"}
PATCH_SHAPES = {"3D patch 4, C=1": (4, 4, 4), "2D patch 16, C=3": (1, 16, 16)}


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel, its launch config and the constexprs and types a real launch gives it."""

    module: str  # medformer_kernels.<module>
    kernel: str
    label: str  # what the variant is, for the report
    config: LaunchConfig
    constexprs: tuple[tuple[str, object], ...]
    pointers: tuple[tuple[str, str], ...]  # pointer argument -> element type ("bf16", "i64", ...) or TMA descriptor
    floats: tuple[str, ...] = ()
    unit_strides: tuple[str, ...] = ()  # strides that are 1 in a real launch (specialised as constants)
    aligned: tuple[str, ...] = ()  # integer arguments that are multiples of 16 in a real launch


@dataclass
class Compiled:
    kernel: str
    label: str
    config: str
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    shared_bytes: int = 0
    tensor_cores: str = "none"  # "wgmma" (Hopper warpgroup MMA), "mma" (mma.sync) or "none"
    tma: bool = False
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0 and self.stack_bytes == 0


def _strides(prefix: str) -> list[str]:
    """The four strides of a [B, H, N, d] tensor argument, e.g. sqb, sqh, sqn, sqd."""
    return [f"{prefix}{axis}" for axis in "bhnd"]


def attention_variants() -> list[Variant]:
    """Every attention launch: forward (plain, split), combine, delta and the fused backward (plain,
    atomic dQ, atomic dK/dV), for each candidate config of each dtype and head dim."""
    from medformer_kernels.attention_plan import COMBINE_BLOCK, DELTA_BLOCK, bwd_candidates, fwd_candidates
    from medformer_kernels.checks import HEAD_DIMS

    module = "triton_attention"
    units = tuple(s for p in "qkvog" for s in _strides(f"s{p}")[3:])
    aligned = tuple(s for p in "qkvog" for s in _strides(f"s{p}")[:3])
    variants = []
    for ty in TRITON_TYPES.values():
        precision = "tf32"  # ignored by 16-bit dots
        for d in HEAD_DIMS:
            fwd = {c for nq in (32, 64, 4096) for c in fwd_candidates(d, nq)}
            for config in sorted(fwd, key=LaunchConfig.label):
                keys = f"tensordesc<{ty}[1,1,{config['BLOCK_N']},{d}]>" if config["TMA"] else ty
                for split in (False, True):
                    out = "fp32" if split else ty
                    variants.append(Variant(
                        module, "_attn_fwd", f"{ty} d={d}" + (" split-KV" if split else ""), config,
                        (("HEAD_DIM", d), ("PRECISION", precision), ("SPLIT", split)),
                        (("Q", ty), ("K", keys), ("V", keys), ("O", out), ("LSE", "fp32")), ("qk_scale",), units,
                        aligned))

            variants.append(Variant(
                module, "_attn_fwd_combine", f"{ty} d={d}", LaunchConfig.of(4, 1, BLOCK_M=COMBINE_BLOCK),
                (("HEAD_DIM", d),), (("O_PART", "fp32"), ("LSE_PART", "fp32"), ("O", ty), ("LSE", "fp32")),
                (), ("sod",), ("sob", "soh", "son")))
            variants.append(Variant(
                module, "_attn_bwd_delta", f"{ty} d={d}", LaunchConfig.of(4, 1, BLOCK_M=DELTA_BLOCK),
                (("HEAD_DIM", d),), (("O", ty), ("DO", ty), ("DELTA", "fp32")), (), ("sod", "sgd"),
                ("sob", "soh", "son", "sgb", "sgh", "sgn")))
            for config in bwd_candidates(d):
                for dq_atomic, kv_atomic, what in ((False, False, ""), (True, False, " atomic dQ"),
                                                   (False, True, " split-Q dK/dV")):
                    variants.append(Variant(
                        module, "_attn_bwd", f"{ty} d={d}{what}", config,
                        (("HEAD_DIM", d), ("PRECISION", precision), ("DQ_ATOMIC", dq_atomic),
                         ("KV_ATOMIC", kv_atomic)),
                        (("Q", ty), ("K", ty), ("V", ty), ("DO", ty), ("LSE", "fp32"), ("DELTA", "fp32"),
                         ("DQ", "fp32" if dq_atomic else ty), ("DK", "fp32" if kv_atomic else ty),
                         ("DV", "fp32" if kv_atomic else ty)),
                        ("sm_scale", "qk_scale"), units, aligned))
    return variants


def patch_embed_variants() -> list[Variant]:
    """Every patch-embedding launch: forward, dW and the dbias/dpos reduction, with and without keep,
    for each candidate config, dtype and a 2D and a 3D patch."""
    from medformer_kernels.triton_patch_embed import DW_CANDIDATES, FWD_CANDIDATES, REDUCE_CONFIG

    module = "triton_patch_embed"
    variants = []
    for ty in TRITON_TYPES.values():
        precision = "tf32"  # ignored by 16-bit dots
        for name, (pd, ph, pw) in PATCH_SHAPES.items():
            patch = (("PD", pd), ("PH", ph), ("PW", pw))
            for keep in (False, True):
                what = f"{ty} {name}" + (" keep" if keep else "")
                for config in FWD_CANDIDATES:
                    variants.append(Variant(
                        module, "_patch_embed_fwd", what, config,
                        (*patch, ("HAS_BIAS", True), ("HAS_POS", True), ("HAS_KEEP", keep), ("PRECISION", precision)),
                        (("X", ty), ("W", ty), ("BIAS", ty), ("POS", ty), ("KEEP", "i64"), ("OUT", ty)),
                        (), ("sxw", "swk", "spe", "skt"), ("sxb", "spn")))
                for config in DW_CANDIDATES:
                    variants.append(Variant(
                        module, "_patch_embed_dw", what, config,
                        (*patch, ("HAS_KEEP", keep), ("PRECISION", precision)),
                        (("X", ty), ("DOUT", ty), ("KEEP", "i64"), ("DW", "fp32")),
                        (), ("sxw", "sge", "skt"), ("sxb", "sgm")))
        for keep in (False, True):
            variants.append(Variant(
                module, "_patch_embed_dbias_dpos", f"{ty}" + (" keep" if keep else ""), REDUCE_CONFIG,
                (("HAS_BIAS", True), ("HAS_POS", True), ("HAS_KEEP", keep)),
                (("DOUT", ty), ("KEEP", "i64"), ("DBIAS", "fp32"), ("DPOS", "fp32" if keep else ty)),
                (), ("sge", "skt"), ("sgb", "sgt")))
    return variants


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, spill stores) of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(_tools() / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(_tools() / "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return registers, stack, len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))


def compile_variant(variant: Variant, arch: int = 90) -> Compiled:
    """Compile one variant for sm_<arch> and read its resources."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Compiled(variant.kernel, variant.label, variant.config.label())
    try:
        fn = getattr(importlib.import_module(f"medformer_kernels.{variant.module}"), variant.kernel)
        units = {name: 1 for name in variant.unit_strides if name in fn.arg_names}
        constexprs = {**dict(variant.constexprs), **dict(variant.config.blocks), **units}
        pointers, floats = dict(variant.pointers), set(variant.floats)
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif pointers.get(name, "").startswith("tensordesc"):
                signature[name] = pointers[name]  # a TMA descriptor: tensordesc<dtype[block]>
            elif name in pointers:
                signature[name] = "*" + pointers[name]
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif name in floats:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if name in variant.aligned:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.config.warps, "num_stages": variant.config.stages})
        result.registers, result.stack_bytes, result.spill_stores = _resources(compiled.asm["cubin"])
        result.shared_bytes = compiled.metadata.shared
        ptx = compiled.asm["ptx"]
        result.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        result.tma = "cp.async.bulk.tensor" in ptx
    except Exception as exc:  # a config that does not compile is a finding, not a crash of the report
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return result


def run_report(variants: list[Variant], arch: int, jobs: int) -> list[Compiled]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, variants, [arch] * len(variants)))


def format_table(results: list[Compiled]) -> str:
    lines = ["| kernel | variant | config | regs | stack B | spill stores | shared KB | tensor cores | TMA | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in results:
        status = "ok" if r.ok else (r.error or "SPILLS")
        lines.append(f"| {r.kernel} | {r.label} | {r.config} | {r.registers} | {r.stack_bytes} | {r.spill_stores} "
                     f"| {r.shared_bytes / 1024:.1f} | {r.tensor_cores} | {'yes' if r.tma else 'no'} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medformer_kernels.compile_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", default="", help="kernels whose name contains this (e.g. attn, patch)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the report compiles for the GPU, not the interpreter", file=sys.stderr)
        return 2
    variants = [v for v in attention_variants() + patch_embed_variants() if args.only in v.kernel]
    results = run_report(variants, args.arch, args.jobs)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} variants compiled for sm_{args.arch}: {len(results) - len(bad)} ok, {len(bad)} spill "
          "or fail")
    if args.json:
        payload = {"arch": args.arch, "results": [asdict(r) | {"ok": r.ok} for r in results]}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
