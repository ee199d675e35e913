#!/usr/bin/env bash
# One prepared script for a lent GPU: CUDA tests, the speed-lever table for DiT-XL/2 at 256 px, and a
# real training run with telemetry; with the argument `reference`, instead: ours against diffusers for
# DiT-XL/2 and mmDiT-XL/2 (needs diffusers); with `sample`: sampling DiT-XL/2 against diffusers'
# DiTPipeline (needs diffusers). Usage (repo root, a GPU machine with torch installed):
#   OUT=/some/dir bash benchmarks/gpu_check.sh [reference|sample]
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
if [ "${1:-}" = reference ]; then
    for model in dit-xl/2 mmdit-xl/2; do
        timeout 280 python3 benchmarks/train_step.py --model $model --batch ${BATCH:-64} --warmup 3 --iters 10 \
            --levers bf16,bf16+compile --reference diffusers 2>&1 | grep -v Warning | tee -a "$OUT/reference.txt"
    done
    exit 0
fi
if [ "${1:-}" = sample ]; then
    timeout 420 python3 benchmarks/sample_speed.py --preset dit-xl/2 --image-size 256 --vae sd --device cuda \
        --dtype bf16 --batch-sizes 1,16,64,256 --steps 50 --reps 3 --tol 2e-3 2>&1 | grep -v Warning | tee "$OUT/sample.txt"
    timeout 150 python3 benchmarks/sample_speed.py --preset dit-xl/2 --image-size 256 --vae sd --device cuda \
        --dtype bf16 --batch-sizes 64 --steps 250 --reps 1 --tol 2e-3 2>&1 | grep -v Warning | tee -a "$OUT/sample.txt"
    exit 0
fi
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_engine.py \
    tests/test_train.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
timeout 260 python3 benchmarks/train_step.py --model dit-xl/2 --batch ${BATCH:-64} --warmup 3 --iters 10 \
    --levers fp32,tf32,bf16,bf16+compile,bf16+compile+ckpt 2>&1 | tee "$OUT/bench.txt"
timeout 120 python3 -m ldmkit.cli train configs/quickstart.yaml run.dir=/tmp/gpu_run model.name=dit-b/2 \
    model.depth=null model.hidden_size=null model.num_heads=null data.image_size=32 \
    train.batch_size=256 train.steps=150 train.precision=bf16 train.compile=true train.log_every=25 \
    train.sample_every=0 train.checkpoint_every=1000 eval.shapes_at_end=false sample.steps=4 \
    --no-progress 2>&1 | tail -6 | tee "$OUT/train.txt"
tail -2 /tmp/gpu_run/metrics.jsonl | tee -a "$OUT/train.txt"
