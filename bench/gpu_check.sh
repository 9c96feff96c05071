#!/usr/bin/env bash
# Every GPU check in one go, on one H100/H200, in under 8 minutes (BUDGET_S, default 460 s):
#   header    card, driver, torch/CUDA, triton, git commit
#   tests     tests/test_gpu.py + tests/test_triton.py on CUDA (compiled Triton: TRITON_INTERPRET unset)
#   kernels   bench/gpu_kernels.py: triton vs blocked vs torch.sparse vs bsr_dense_mm vs dense;
#             edge-samples/s and GB/s against the card's memory bandwidth
#   step      bench/step.py (one full training step, timed), if that script exists
#   train_2b  a few steps of configs/gpu_2b.yaml (>= 2B parameters, torch engine) via the real CLI
# Each stage runs under its own time limit, capped by what is left of the budget; a failure or a
# timeout is recorded with its exit code and the next stage runs anyway. Everything goes into ONE
# file, ${OUT:-gpu_results}/results.txt, ending with a one-line summary per stage. The 2B run
# directory (its final checkpoint is ~25 GB) lives outside $OUT (RUN_DIR, default
# /tmp/randlift_gpu_2b) and is deleted once its metrics are copied into the results.
# Run from anywhere, with the project installed on a CUDA build of torch (and triton).
# Dry run of the script itself on a CPU machine (small 2B-stage lift, short budget):
#   GPU_CHECK_ALLOW_CPU=1 EXTRA_2B="model.lift.size=512" BUDGET_S=200 OUT=/tmp/gc bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_results}
BUDGET_S=${BUDGET_S:-460}
RUN_DIR=${RUN_DIR:-/tmp/randlift_gpu_2b}
STEPS_2B=${STEPS_2B:-5}
mkdir -p "$OUT"
RES="$OUT/results.txt"
: > "$RES"
T0=$SECONDS
SUMMARY=()
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

log() { echo "$*" | tee -a "$RES"; }

# stage NAME LIMIT_S CMD...: run CMD (output into the results) under min(LIMIT_S, time left).
stage() {
  local name=$1 limit=$2 left rc st s
  shift 2
  left=$(( BUDGET_S - (SECONDS - T0) ))
  if (( limit > left )); then limit=$left; fi
  if (( limit < 20 )); then
    log "=== $name: SKIPPED (time budget spent, ${left}s left)"
    SUMMARY+=("$name: SKIPPED (budget)")
    return 0
  fi
  log "=== $name (limit ${limit}s, t=$(( SECONDS - T0 ))s): $*"
  s=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$RES"
  rc=${PIPESTATUS[0]}
  if (( rc == 0 )); then st=ok; elif (( rc == 124 || rc == 137 )); then st=TIMEOUT; else st=FAILED; fi
  log "=== $name: $st (exit $rc, $(( SECONDS - s ))s)"
  SUMMARY+=("$name: $st (exit $rc, $(( SECONDS - s ))s)")
}

{
  echo "=== header ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET_S}s)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
  python - <<'EOF' 2>&1
import torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cuda available", cuda,
      "|", torch.cuda.get_device_name(0) if cuda else "no CUDA device")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
EOF
  echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)" \
       "($(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') paths differ from it)"
} | tee -a "$RES"
if [[ -z ${GPU_CHECK_ALLOW_CPU:-} ]] && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "=== no CUDA device visible to torch: install a CUDA build of torch; nothing else run"
  exit 1
fi

stage tests 150 python -m pytest -q -rfEs -p no:cacheprovider tests/test_gpu.py tests/test_triton.py
stage kernels 80 python bench/gpu_kernels.py --budget-s 50
if [[ -f bench/step.py ]]; then
  stage step 40 python bench/step.py
else
  log "=== step: bench/step.py absent, skipped"
  SUMMARY+=("step: absent")
fi
rm -rf "$RUN_DIR"
stage train_2b 400 python -m randlift_dist.train --config configs/gpu_2b.yaml "run.dir=$RUN_DIR" \
  run.progress=false "train.steps=$STEPS_2B" train.resume=none ${EXTRA_2B:-}
{
  echo "--- train_2b metrics.jsonl"
  cat "$RUN_DIR/metrics.jsonl" 2>/dev/null || echo "(none)"
  echo "--- train_2b lift_stats.json (first 2000 bytes)"
  head -c 2000 "$RUN_DIR/lift_stats.json" 2>/dev/null || echo "(none)"
  echo
  du -sh "$RUN_DIR/checkpoints" 2>/dev/null || true
} | tee -a "$RES"
rm -rf "$RUN_DIR"

log "=== summary (total $(( SECONDS - T0 ))s of ${BUDGET_S}s)"
for line in "${SUMMARY[@]}"; do log "  $line"; done
