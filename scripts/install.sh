#!/usr/bin/env bash
# Set up ./.venv with medformer on a fresh machine. `--test` adds what the test suite needs.
#
# torch: an already-installed torch is kept; otherwise torch==2.13.0 (the CPU wheel here, ~750 MB).
# medmnist: installed without its dependencies, because it pulls torchvision, and torchvision pulls
# a ~5.5 GB CUDA torch; medformer only reads medmnist's metadata and never its torchvision download.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip setuptools
$py -c "import torch" 2>/dev/null || $py -m pip install --quiet "torch==2.13.0"
$py -m pip install --quiet --no-deps "medmnist==3.0.2"
$py -m pip install --quiet -e ".${extras}"
echo "medformer installed in .venv ($($py -c 'import torch; print("torch", torch.__version__)'))"
