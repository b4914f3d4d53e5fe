#!/usr/bin/env bash
# vensemble on one GPU in one time-bounded call: environment, correctness checks, the benchmark
# suite, the N sweep and the training benchmark, each a stage under `timeout`.
#
#   benchmarks/gpu.sh [OUTDIR]        (default: $OUT, else ./bench-gpu)
#
# Stages, in order of importance, with their budgets in seconds (override with the variables):
#   env    GPU_SH_ENV_S=15     torch, CUDA and GPU versions, nvidia-smi
#   jax    GPU_SH_JAX_S=15     JAX (a peer) next to torch on the GPU in one process; when it
#                              fails, the benchmark stages run without peers (--no-peers)
#   check  GPU_SH_CHECK_S=60   benchmarks/gpu_check.py: every backend against the loop on the GPU
#   bench  GPU_SH_BENCH_S=280  `vensemble bench`, compiled with CUDA graphs (reduce-overhead)
#                              (an H200 host of 2026-11-29 needed more than 220 s for it)
#   sweep  GPU_SH_SWEEP_S=75   `vensemble bench --workload sweep`, no compile
#   train  GPU_SH_TRAIN_S=95   benchmarks/train_bench.py on the GPU (JAX + optax compile too)
# A stage that fails or runs out of time is logged and the next one runs. No stage runs past
# GPU_SH_TOTAL_S=530 seconds from the start (a stage gets at most what is left), so the whole
# call ends within about 9.5 minutes (a device call may run 10). The suite writes its JSON and markdown after every
# workload, so a stage stopped by its timeout keeps what it measured.
#
# OUTDIR receives 7 files: gpu.log (everything below), gpu_check.log, results_cuda.json,
# results_cuda.md, sweep_cuda.json, sweep_cuda.png and train_cuda.log.
#
# Extra flags: BENCH_ARGS (bench stage), SWEEP_ARGS, TRAIN_ARGS, CHECK_ARGS; GPU_SH_WORKLOADS
# (the bench stage's workloads, in order). GPU_SH_DEVICE=cpu runs the same stages on the CPU
# (to try this script on a machine without a GPU; the files are then named *_cpu.*).
#
# Uses the python3 that already has a CUDA torch when there is one and runs this checkout
# from source (no install, no network); otherwise makes build/venv-gpu and installs
# torch==2.13.0 and this repo from PyPI.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/bench-gpu}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$ROOT" || exit 1

DEV="${GPU_SH_DEVICE:-cuda}"
TAG="${DEV%%:*}"  # cuda or cpu: in the file names
TOTAL_S="${GPU_SH_TOTAL_S:-530}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX (a peer) must not take the GPU's memory

has_torch() {  # has_torch PYTHON: torch imports, and sees a GPU unless DEV is cpu
    if [[ $TAG == cpu ]]; then
        "$1" -c 'import torch' 2>/dev/null
    else
        "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
    fi
}

setup_python() {
    PY="${PYTHON:-python3}"
    if has_torch "$PY"; then
        # Reuse the machine's torch; run this checkout from source (its other needs:
        # safetensors, tqdm, matplotlib; scikit-learn for the digits; the peers are optional).
        export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
        return 0
    fi
    local venv="$ROOT/build/venv-gpu"  # build/ is git-ignored
    test -x "$venv/bin/python" || "$PY" -m venv "$venv"
    if ! has_torch "$venv/bin/python"; then
        "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    fi
    "$venv/bin/python" -m pip install --quiet -e ".[plot,data]"
    PY="$venv/bin/python"
    has_torch "$PY"
}

T0=$SECONDS
SUMMARY=()
FAILED=0

# stage NAME BUDGET LOG COMMAND...: run COMMAND under `timeout` (at most BUDGET seconds and
# what is left of TOTAL_S), its output also into OUTDIR/LOG unless LOG is "-"; returns its
# exit status.
stage() {
    local name=$1 budget=$2 log=$3
    shift 3
    local left=$((TOTAL_S - (SECONDS - T0)))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        echo "=== stage $name: SKIPPED, ${left} s left of the ${TOTAL_S} s total ==="
        SUMMARY+=("$name: skipped (no time left)")
        FAILED=1
        return 1
    fi
    echo
    echo "=== stage $name: starts at t=$((SECONDS - T0)) s, budget ${budget} s ==="
    local shown=() arg
    for arg in "$@"; do
        [[ $arg == *$'\n'* ]] && arg="<script>"
        shown+=("$arg")
    done
    echo "+ ${shown[*]}"
    local start=$SECONDS rc status
    if [[ $log == - ]]; then
        timeout -k 5 "$budget" "$@"
        rc=$?
    else
        timeout -k 5 "$budget" "$@" 2>&1 | tee "$OUTDIR/$log"
        rc=${PIPESTATUS[0]}
    fi
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMED OUT after ${budget} s (exit $rc)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILED=1
    echo "=== stage $name: $status, $((SECONDS - start)) s elapsed (total $((SECONDS - T0)) s) ==="
    SUMMARY+=("$name: $status, $((SECONDS - start)) s")
    return "$rc"
}

ENV_INFO=$(
    cat <<'PYTHON'
import importlib, importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.1f} GiB",
          f"| {p.multi_processor_count} SMs | capability {p.major}.{p.minor}")
else:
    print("GPU: none visible to torch")
for name in ("triton", "numpy", "safetensors", "matplotlib", "sklearn", "tensordict"):
    if importlib.util.find_spec(name) is None:
        print(f"  {name}: not installed")
        continue
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as err:
        print(f"  {name}: fails to import: {type(err).__name__}: {err}")
PYTHON
)

# What the benchmark does with JAX: torch on the device first, then a jit(vmap) matmul there.
JAX_PROBE=$(
    cat <<'PYTHON'
import sys, time, torch
start = time.perf_counter()
device = sys.argv[1]
a = torch.randn(64, 64, device=device)
(a @ a).sum().item()  # torch's context and cuBLAS first, as in the benchmark
import jax, jax.numpy as jnp
print("jax", jax.__version__, "| default backend", jax.default_backend(), "|", jax.devices())
if device.startswith("cuda") and jax.default_backend() != "gpu":
    print("jax has no GPU backend here: the benchmark skips it (n/a)")
x = jnp.asarray(a.cpu().numpy())
y = jax.jit(jax.vmap(lambda w, v: v @ w, in_axes=(0, None)))(jnp.stack([x, x]), x)
got = torch.from_numpy(jax.device_get(y).copy())
want = torch.stack([a.cpu() @ a.cpu()] * 2)
print(f"jit(vmap) matmul on {y.devices()}: max |diff| from torch {float((got - want).abs().max()):.1e}"
      f" ({time.perf_counter() - start:.1f} s)")
PYTHON
)

# shellcheck disable=SC2317  # run by `timeout bash -c env_stage` (exported below)
env_stage() {  # fails when torch does not import
    echo "CPU cores: $(nproc)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm \
            --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" -c "$ENV_INFO"
}

main() {
    echo "gpu.sh: device $DEV, outputs in $OUTDIR, at most ${TOTAL_S} s of stages"
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    if ! setup_python; then
        echo "gpu.sh: no torch (with a GPU, for device $DEV) in ${PY}" >&2
        timeout 60 "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
        command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
        return 1
    fi
    echo "python: $PY (PYTHONPATH=${PYTHONPATH:-})"
    export -f env_stage
    export PY ENV_INFO

    local extra workloads peers=()
    stage env "${GPU_SH_ENV_S:-15}" - bash -c env_stage
    if ! stage jax "${GPU_SH_JAX_S:-15}" - "$PY" -c "$JAX_PROBE" "$DEV"; then
        peers=(--no-peers)
        echo "gpu.sh: JAX next to torch failed: the benchmark stages run with --no-peers"
    fi

    read -r -a extra <<<"${CHECK_ARGS:-}"
    stage check "${GPU_SH_CHECK_S:-60}" "gpu_check.log" \
        "$PY" benchmarks/gpu_check.py --device "$DEV" --compile-timeout 35 "${extra[@]}"

    # CUDA graphs through torch.compile(mode="reduce-overhead"). Only fused and auto get a
    # compiled vensemble candidate (compile=True compiles the fused program; loop and vmap
    # would time their eager code again); the compiled torch.func baseline is kept. No
    # retries: a retry measures the workload again, compiles included.
    read -r -a extra <<<"${BENCH_ARGS:-}"
    read -r -a workloads <<<"${GPU_SH_WORKLOADS:-tutorial1 tutorial2 small100 tiny1000 cnn8 memory}"
    stage bench "${GPU_SH_BENCH_S:-280}" - \
        "$PY" -m vensemble bench --device "$DEV" --compile-mode reduce-overhead \
        --rounds 5 --compile-timeout 60 --compile-backends fused,auto --retries 0 \
        "${workloads[@]/#/--workload=}" \
        --json "$OUTDIR/results_$TAG.json" --markdown "$OUTDIR/results_$TAG.md" \
        "${peers[@]}" "${extra[@]}"

    read -r -a extra <<<"${SWEEP_ARGS:-}"
    stage sweep "${GPU_SH_SWEEP_S:-75}" - \
        "$PY" -m vensemble bench --device "$DEV" --workload sweep --no-compile --rounds 3 \
        --retries 0 --json "$OUTDIR/sweep_$TAG.json" --plot "$OUTDIR/sweep_$TAG.png" \
        "${peers[@]}" "${extra[@]}"

    read -r -a extra <<<"${TRAIN_ARGS:-}"
    stage train "${GPU_SH_TRAIN_S:-95}" "train_$TAG.log" \
        "$PY" benchmarks/train_bench.py --device "$DEV" --rounds 5 "${extra[@]}"

    rm -f "$OUTDIR"/.*.tmp  # a write cut short by a timeout
    echo
    echo "=== summary: $((SECONDS - T0)) s in all ==="
    printf '  %s\n' "${SUMMARY[@]}"
    echo "files in $OUTDIR:"
    (cd "$OUTDIR" && ls -la)
    local count
    count=$(find "$OUTDIR" -type f | wc -l)
    if ((count > 8)); then
        echo "gpu.sh: warning: $count files in $OUTDIR (only 8 come back)"
    fi
    return "$FAILED"
}

main 2>&1 | tee -a "$OUTDIR/gpu.log"
exit "${PIPESTATUS[0]}"
