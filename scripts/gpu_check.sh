#!/usr/bin/env bash
# The prepared GPU check, sized for one 10-minute call (about 6 minutes of step limits): the sm_90
# compile report, the GPU kernel tests, both kernel benchmarks in bf16 and a `small` training step
# with and without the kernels. Each step has its own time limit and runs whatever the others did;
# `$OUT/summary.md` lists every target as met, missed or not measured, with the card's name.
#
#   scripts/gpu_check.sh            # or: OUT=/some/dir PYTHON=python3 scripts/gpu_check.sh
#   DRY_RUN=1 scripts/gpu_check.sh  # on a machine without a GPU: print the steps, write an empty summary
#
# Needs torch with CUDA, triton, pytest, typer and rich (pytest-xdist is used when present).
# medformer itself is used installed, else installed editable without dependencies, else put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
unset TRITON_INTERPRET MEDFORMER_KERNELS MEDFORMER_AUTOTUNE
export COLUMNS=200 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export MEDFORMER_KERNEL_CACHE="$OUT/kernel_configs.json"

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi

importable() { "$PYTHON" -c "import medformer_kernels.dispatch, medformer_cli.bench" 2>/dev/null; }
if ! importable; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! importable; then
    shim="$(mktemp -d)"
    ln -s "$PWD/kernels" "$shim/medformer_kernels"
    ln -s "$PWD/cli" "$shim/medformer_cli"
    ln -s "$PWD/medformer_core" "$shim/medformer_core"
    ln -s "$PWD/plugins" "$shim/medformer_plugins"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

: > "$OUT/steps.tsv"
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log to $OUT/LOG, record exit and seconds
    local name="$1" seconds="$2" log="$3"
    shift 3
    echo "== $name (limit ${seconds}s)"
    if [ -n "${DRY_RUN:-}" ]; then
        echo "   $*"
        return
    fi
    local start=$SECONDS rc=0
    timeout --kill-after=5 "$seconds" "$@" > "$OUT/$log" 2>&1 || rc=$?
    tail -n 25 "$OUT/$log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

xdist=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    xdist=(-n 8)
fi
bench=("$PYTHON" -c "from medformer_cli.bench import app; app(prog_name='medformer bench')")

step "environment" 20 env.txt bash -c "date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; nvidia-smi \
--query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PYTHON -c \"import sys, torch, triton; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__); \
print('device', torch.cuda.get_device_name(), '| SMs', torch.cuda.get_device_properties(0).multi_processor_count)\""
step "compile report (sm_90)" 45 compile_report.md \
    "$PYTHON" -m medformer_kernels.compile_report --arch 90 --json "$OUT/compile_report.json"
step "GPU tests" 120 gpu_tests.log \
    "$PYTHON" -m pytest tests/kernels -m gpu -q -p no:cacheprovider -rs "${xdist[@]}" --junitxml="$OUT/gpu_tests.xml"
step "bench attention" 90 attention.txt "${bench[@]}" attention --dtype bf16 --budget 0.15 --json "$OUT/attention.json"
step "bench patch-embed" 50 patch_embed.txt "${bench[@]}" patch-embed --dtype bf16 --budget 0.15 \
    --json "$OUT/patch_embed.json"
step "train step (small, 64^3)" 60 train_step.txt "$PYTHON" benchmarks/train_step.py --json "$OUT/train_step.json"

"$PYTHON" benchmarks/gpu_summary.py "$OUT"
