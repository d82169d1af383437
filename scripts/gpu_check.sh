#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (issue 7): the GPU kernel tests, then both benchmarks in
# bf16, with results under $OUT (default ./gpu_out). Bounded to about 8 minutes: each step has its own
# timeout, a failed or timed-out step does not stop the next, and the exit status is non-zero if any failed.
#
#   scripts/gpu_check.sh            # or: OUT=/some/dir PYTHON=python3 scripts/gpu_check.sh
#
# Needs torch with CUDA, triton, pytest, typer and rich (a lent machine's image has them; it has no network).
# medformer itself is used installed, else installed editable without dependencies, else put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
unset TRITON_INTERPRET MEDFORMER_KERNELS
export COLUMNS=200 PYTHONUNBUFFERED=1

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

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    "$PYTHON" - <<'PY'
import sys, torch, triton, medformer_kernels
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
PY
} 2>&1 | tee "$OUT/env.txt"

failed=()
step() {  # step NAME SECONDS LOG COMMAND...: run with a timeout, log to $OUT/LOG, record a failure
    local name="$1" seconds="$2" log="$3"
    shift 3
    echo "== $name (limit ${seconds}s)"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$log" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

bench=("$PYTHON" -c "from medformer_cli.bench import app; app(prog_name='medformer bench')")

: > "$OUT/summary.txt"
step "GPU tests" 270 gpu_tests.log \
    "$PYTHON" -m pytest tests/kernels -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/gpu_tests.xml"
step "bench attention" 110 attention.txt "${bench[@]}" attention --dtype bf16 --json "$OUT/attention.json"
step "bench patch-embed" 80 patch_embed.txt "${bench[@]}" patch-embed --dtype bf16 --json "$OUT/patch_embed.json"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$OUT/summary.txt"
    exit 1
fi
echo "all steps passed; results in $OUT" | tee -a "$OUT/summary.txt"
