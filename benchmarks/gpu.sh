#!/usr/bin/env bash
# The benchmark suite on CUDA: JSON, PNG and a markdown table in one output folder.
#
#   benchmarks/gpu.sh [OUTDIR]        (default: $OUT, else ./bench-gpu)
#
# Uses the python3 that already has a CUDA torch when there is one (no install, no network);
# otherwise makes build/venv-gpu and installs torch==2.13.0 and this repo from PyPI.
# Extra flags for `vensemble bench` can be given in BENCH_ARGS (e.g. BENCH_ARGS="--rounds 3").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/bench-gpu}}"
mkdir -p "$OUTDIR"
cd "$ROOT"

has_cuda_torch() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

PY="${PYTHON:-python3}"
if has_cuda_torch "$PY"; then
    # Reuse the machine's torch; run this checkout from source (its other needs: safetensors,
    # tqdm, matplotlib; the peers are optional).
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
    VENV="$ROOT/build/venv-gpu"  # build/ is git-ignored
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    if ! has_cuda_torch "$VENV/bin/python"; then
        "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[plot]"
    PY="$VENV/bin/python"
fi
has_cuda_torch "$PY" || { echo "gpu.sh: no CUDA device visible to torch" >&2; exit 1; }

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX (a peer) must not take the GPU's memory
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# CUDA graphs through torch.compile(mode="reduce-overhead") for every compiled candidate.
# shellcheck disable=SC2086
"$PY" -m vensemble bench --device cuda --compile-mode reduce-overhead \
    --json "$OUTDIR/results_cuda.json" \
    --plot "$OUTDIR/sweep_cuda.png" \
    --markdown "$OUTDIR/results_cuda.md" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/bench_cuda.log"
