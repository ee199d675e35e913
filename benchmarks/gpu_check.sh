#!/usr/bin/env bash
# One prepared script for a lent GPU: CUDA/bf16 tests, throughput table, quickstart timing.
# Usage (repo root, GPU machine with torch installed): OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m "not slow" tests 2>&1 | tail -25 | tee "$OUT/pytest.txt"
python3 benchmarks/train_step.py --model dit-xl/2 --input-size 32 --channels 4 --batch 32 2>&1 | tee "$OUT/bench.txt"
python3 benchmarks/train_step.py --model dit-b/2 --input-size 32 --channels 4 --batch 64 2>&1 | tee -a "$OUT/bench.txt"
start=$(date +%s)
python3 -m ldmkit.cli train configs/quickstart.yaml run.dir=/tmp/qs_gpu --no-progress 2>&1 | tail -12 | tee "$OUT/quickstart.txt"
echo "quickstart wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/quickstart.txt"
cp /tmp/qs_gpu/samples/final.png "$OUT/quickstart_gpu_final.png" 2>/dev/null || true
