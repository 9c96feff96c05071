#!/usr/bin/env bash
# Every GPU check in one go, for a session that is lent a GPU: correctness (tests/test_gpu.py),
# kernel timings against torch.sparse and dense on the GPU, and a short sharded-free training run.
# Writes everything under ${OUT:-gpu_results}/; run from the repository root in an environment
# where the project is installed (with a CUDA build of torch).
set -euo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/device.txt"
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"
python bench/gpu_kernels.py 2>&1 | tee "$OUT/kernels.txt"
