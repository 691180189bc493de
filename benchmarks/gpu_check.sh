#!/usr/bin/env bash
# One check for a machine with a CUDA GPU (about 5-8 minutes on an H100 / H200), everything into ONE results file:
#   1. the CUDA-marked tests (pytest -m cuda);
#   2. the rasterizer benchmark at batch 12 (ratio to a ResNet-50 forward) and images/s at batch 64
#      (target >= 5000 on an H100 / H200), with the nvdiffrast comparison when nvdiffrast is installed;
#   3. a short Step 1 at 224 px, ResNet-50, batch 32: iterations/s and the renderer's share (target <= 0.15),
#      in float32 and with --amp (bfloat16 encoder).
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]      (default: runs/gpu_check/results.txt)
#
# Without CUDA it says so in the file and runs a reduced CPU version of steps 2 and 3 (small mesh, tiny batches) so
# the script itself stays tested; it exits 0 when every step it ran passed, 1 otherwise. Run it from anywhere;
# PYTHON overrides the interpreter (default: the repository's .venv, else python3).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ge 1 ]; then case "$1" in /*) ;; *) set -- "$PWD/$1" ;; esac; fi  # a relative RESULTS_FILE: from the caller's folder
cd "$REPO"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${1:-runs/gpu_check/results.txt}"
mkdir -p "$(dirname "$OUT")"
WORK="$(dirname "$OUT")/work"
: > "$OUT"
FAILED=0

log() { echo "$*" | tee -a "$OUT"; }

# run TITLE TIMEOUT_S CMD...: run CMD under a time limit, its output appended to the results file
run() {
    local title="$1" limit="$2"
    shift 2
    log ""
    log "== $title"
    log "\$ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
    local status=${PIPESTATUS[0]}
    log "-- exit $status after $((SECONDS - start)) s"
    if [ "$status" -ne 0 ]; then FAILED=1; fi
}

log "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if [ "$HAS_CUDA" = "1" ]; then
    run "CUDA tests" 240 "$PY" -m pytest -q -m cuda tests
    run "rasterizer benchmark (batch 12; images/s at batch 64)" 180 \
        "$PY" benchmarks/rasterizer.py --device cuda --batch 12 --cuda_batch 64 --repeats 10 --compare_nvdiffrast
    run "Step 1, 224 px, ResNet-50, batch 32, float32" 150 \
        "$PY" benchmarks/step1_profile.py --preset paper --batch_size 32 --iters 20 --warmup 3 --workers 4 \
        --device cuda --work_dir "$WORK"
    run "Step 1, 224 px, ResNet-50, batch 32, --amp (bfloat16 encoder)" 120 \
        "$PY" benchmarks/step1_profile.py --preset paper --batch_size 32 --iters 20 --warmup 3 --workers 4 \
        --device cuda --amp --work_dir "$WORK"
else
    log ""
    log "== no CUDA device: CUDA tests and GPU figures skipped; reduced CPU run of the benchmark and the profile"
    run "rasterizer benchmark (CPU, reduced: demo mesh, 96 px, batch 2)" 300 \
        "$PY" benchmarks/rasterizer.py --device cpu --bfm basel_3DMM/demo_face_model.h5 --size 96 --batch 2 \
        --repeats 2
    run "Step 1 profile (CPU, reduced: 32 px, ResNet-18, batch 4)" 300 \
        "$PY" benchmarks/step1_profile.py --preset demo --image_size 32 --batch_size 4 --iters 2 --warmup 1 \
        --device cpu --work_dir "$WORK"
fi

log ""
if [ "$FAILED" -eq 0 ]; then log "gpu_check: all steps passed"; else log "gpu_check: SOME STEPS FAILED (see above)"; fi
log "results: $OUT"
exit "$FAILED"
