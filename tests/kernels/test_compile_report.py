"""Every shipped kernel config compiles for sm_90 without register spills, checked on a machine with no GPU.

The report runs in a subprocess because it compiles for the GPU, while the other kernel tests load the
kernels for Triton's CPU interpreter (TRITON_INTERPRET is read once, at import).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists(),
                                reason="Triton's bundled NVIDIA tools (ptxas, cuobjdump) are not installed")


def _gpu_compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"TRITON_DEFAULT_FP_FUSION": "1"}


def test_every_candidate_config_is_in_the_report():
    from medformer_kernels import compile_report, triton_patch_embed
    from medformer_kernels.attention_plan import bwd_candidates, fwd_candidates
    from medformer_kernels.checks import HEAD_DIMS

    attention = compile_report.attention_variants()
    for d in HEAD_DIMS:
        compiled = {v.config for v in attention if v.kernel == "_attn_fwd" and f"d={d}" in v.label}
        assert {c for nq in (16, 32, 64, 65, 4096) for c in fwd_candidates(d, nq)} <= compiled
        compiled = {v.config for v in attention if v.kernel == "_attn_bwd" and f"d={d}" in v.label}
        assert set(bwd_candidates(d)) <= compiled
    patch = compile_report.patch_embed_variants()
    assert set(triton_patch_embed.FWD_CANDIDATES) <= {v.config for v in patch if v.kernel == "_patch_embed_fwd"}
    assert set(triton_patch_embed.DW_CANDIDATES) <= {v.config for v in patch if v.kernel == "_patch_embed_dw"}


def test_the_report_sees_a_spill(tmp_path):
    """The detector itself: fp32 FMA dots over d=128 in 64x32 tiles cannot fit in registers."""
    script = """
import dataclasses, json, sys
from medformer_kernels import compile_report
from medformer_kernels.configs import LaunchConfig
base = next(v for v in compile_report.attention_variants() if v.kernel == "_attn_fwd" and v.label == "bf16 d=128")
constexprs = tuple((k, "ieee" if k == "PRECISION" else v) for k, v in base.constexprs)
pointers = tuple((name, "fp32") for name, _ in base.pointers)
config = LaunchConfig.of(4, 2, BLOCK_M=64, BLOCK_N=32, TMA=0)
variant = dataclasses.replace(base, config=config, constexprs=constexprs, pointers=pointers)
print(json.dumps(dataclasses.asdict(compile_report.compile_variant(variant))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_gpu_compile_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["error"] and result["spill_stores"] > 0 and result["stack_bytes"] > 0


@pytest.mark.slow
def test_no_shipped_config_spills_on_sm90(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "medformer_kernels.compile_report", "--arch", "90", "--json",
                           str(report)], capture_output=True, text=True, env=_gpu_compile_env(), timeout=1200)
    results = json.loads(report.read_text())["results"]
    bad = [f"{r['kernel']} {r['label']} {r['config']}: {r['error'] or 'spills'}" for r in results if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_attn_fwd", "_attn_fwd_combine", "_attn_bwd_delta", "_attn_bwd", "_patch_embed_fwd",
                       "_patch_embed_dw", "_patch_embed_dbias_dpos"}
    gemms = [r for r in results if r["kernel"] in ("_attn_fwd", "_attn_bwd", "_patch_embed_fwd", "_patch_embed_dw")]
    assert all(r["tensor_cores"] != "none" for r in gemms), "a GEMM kernel does not use tensor cores"
    wide = [r for r in gemms if "BLOCK_M=32" not in r["config"]]  # 64+ rows: one warpgroup MMA tile
    assert all(r["tensor_cores"] == "wgmma" for r in wide), "a 64+-row tile does not use Hopper's wgmma"
    tma = [r["tma"] for r in results if r["kernel"] == "_attn_fwd" and "TMA=1" in r["config"]]
    assert tma and all(tma), "a TMA config does not load through the tensor memory accelerator"
