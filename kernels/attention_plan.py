"""How one fused-attention call is launched: block sizes per shape class, and when to split the work.

The model's hot path is cross attention: 32 to 256 latents over thousands of tokens, and the reverse.
There one program per (query block, batch*head) leaves most of a GPU idle, so:
- the forward splits the keys into ranges and merges the partial softmaxes in a combine pass
  (split-KV, as flash-decoding does) when the query programs are well under the SM count;
- the backward runs one program per key block and adds dQ atomically when the dQ programs would be
  few and long (small Nq), and splits dK/dV over query ranges, added atomically, when the key
  programs would be few and long (small Nk).
Pure Python (no Triton import), so the plan is tested on any machine.
"""

from dataclasses import dataclass

from medformer_kernels.configs import LaunchConfig

INTERPRETER_FWD = LaunchConfig.of(1, 1, BLOCK_M=16, BLOCK_N=16, TMA=0)
INTERPRETER_BWD = LaunchConfig.of(1, 1, BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16)
DELTA_BLOCK = 128
COMBINE_BLOCK = 32  # rows per program of the split-KV combine pass (an fp32 [rows, d] accumulator)
MAX_SPLITS = 32


@dataclass(frozen=True)
class AttentionPlan:
    """fwd: BLOCK_M, BLOCK_N; bwd: BLOCK_M1/BLOCK_N1 (dK/dV programs), BLOCK_M2/BLOCK_N2 (dQ programs)."""

    fwd: LaunchConfig
    bwd: LaunchConfig
    kv_splits: int = 1  # forward: key ranges per query block, merged by the combine pass (1: no split)
    q_splits: int = 1  # backward: query ranges per key block, dK/dV added atomically (1: no split)
    dq_atomic: bool = False  # backward: dQ added atomically by the key-block programs


def _fwd(warps: int, stages: int, block_m: int, block_n: int, tma: int = 1) -> LaunchConfig:
    return LaunchConfig.of(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n, TMA=tma)


def fwd_candidates(d: int, nq: int) -> list[LaunchConfig]:
    """Forward configs for a GPU (fp16/bf16), the pinned default first: query blocks sized to Nq (32
    latents fill a 32-row tile), 8 warps for the large tiles, keys read through TMA descriptors on
    Hopper (TMA=0, plain loads, is the tuning alternative). None spills on sm_90 (compile_report)."""
    if nq <= 32:  # 32-row tiles run mma.sync; a 64-row wgmma tile, half empty, is the tuning alternative
        return [_fwd(4, 3, 32, 64), _fwd(4, 3, 32, 64, tma=0), _fwd(4, 3, 32, 32), _fwd(4, 3, 64, 64)]
    if d == 128:
        return [_fwd(8, 3, 128, 64), _fwd(8, 3, 128, 64, tma=0), _fwd(4, 3, 64, 64), _fwd(8, 2, 128, 128)]
    if nq <= 64:
        return [_fwd(4, 3, 64, 64), _fwd(4, 3, 64, 64, tma=0), _fwd(4, 3, 64, 128)]
    return [_fwd(4, 3, 128, 64), _fwd(4, 3, 128, 64, tma=0), _fwd(8, 3, 128, 128), _fwd(8, 4, 128, 64),
            _fwd(4, 3, 64, 64)]


def bwd_candidates(d: int) -> list[LaunchConfig]:
    """Backward configs for a GPU (fp16/bf16), the pinned default first. dK/dV programs hold a key
    block and stream narrow query blocks, dQ programs the reverse (the shapes of Triton's tutorial 06)."""
    if d == 128:
        return [LaunchConfig.of(8, 2, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32),
                LaunchConfig.of(8, 2, BLOCK_M1=16, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=16)]
    return [LaunchConfig.of(8, 3, BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32),
            LaunchConfig.of(4, 3, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32),
            LaunchConfig.of(4, 3, BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64)]


def splits_for(programs: int, blocks: int, sms: int) -> int:
    """How many ranges to split each program's `blocks`-long loop into: 1 when the programs already
    fill the GPU (at least half the SMs) or the loop is short; else about two waves of programs, with
    at least two blocks per range."""
    if programs * 2 > sms or blocks < 4:
        return 1
    return max(1, min(2 * sms // programs, blocks // 2, MAX_SPLITS))


def make_plan(fwd: LaunchConfig, bwd: LaunchConfig, bh: int, nq: int, nk: int, sms: int) -> AttentionPlan:
    """The splits for B*H = bh heads of Nq queries over Nk keys on a GPU with `sms` multiprocessors."""
    query_programs = -(-nq // fwd["BLOCK_M"]) * bh
    kv_splits = splits_for(query_programs, -(-nk // fwd["BLOCK_N"]), sms)
    key_programs = -(-nk // bwd["BLOCK_N1"]) * bh
    q_splits = splits_for(key_programs, -(-nq // bwd["BLOCK_M1"]), sms)
    dq_programs = -(-nq // bwd["BLOCK_M2"]) * bh
    dq_atomic = q_splits == 1 and splits_for(dq_programs, -(-nk // bwd["BLOCK_N2"]), sms) > 1
    return AttentionPlan(fwd, bwd, kv_splits, q_splits, dq_atomic)
