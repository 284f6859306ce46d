#!/usr/bin/env bash
# One prepared GPU check (about 5 minutes on one H100): CUDA tests, then the GPU benchmarks (W1 with
# default settings first and second call at B=100,000, then compiled W1 per size, E-step bandwidth, W2, W3).
# Usage on a CUDA machine, from the repository root:  bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
timeout 70 python3 -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$out/cuda_tests.log" | tail -5
timeout 170 python3 benchmarks/gpu_bench.py --out "$out/gpu_bench.md" --sizes ${SIZES:-10000,100000} 2>&1 | grep -v "^W1127\|^V1127" | tee "$out/gpu_bench.log" | tail -20
