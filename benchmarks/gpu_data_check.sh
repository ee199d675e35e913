#!/usr/bin/env bash
# One prepared script for a lent GPU: the data pipeline on CUDA. Cache/autoencoder tests, VAE encoding speed
# (benchmarks/encode_speed.py), loading speed with many cores (benchmarks/data_loading.py), and
# `ldmkit encode` + `ldmkit train` from the cache with telemetry. Usage (repo root, torch + diffusers +
# webdataset importable): OUT=/some/dir bash benchmarks/gpu_data_check.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_data}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, os; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cpus', os.cpu_count())" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_latents.py tests/test_autoencoders.py \
    tests/test_cuda.py 2>&1 | tail -6 | tee "$OUT/pytest.txt"
timeout 120 python3 benchmarks/encode_speed.py --batch 32 --iters 5 2>&1 | grep -v Warn | tee "$OUT/encode_speed.txt"
timeout 110 python3 benchmarks/data_loading.py --workers 0,8,16 --images 1500 --latents 50000 --seconds 4 2>&1 \
    | tail -14 | tee "$OUT/loading.txt"
# End to end at 256 px: shapes -> a random-weight SD-architecture VAE (bf16) -> cache -> DiT-B/2 bf16+compile.
python3 -c "
from diffusers import AutoencoderKL
AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2, latent_channels=4).save_pretrained('/tmp/sdvae')"
COMMON="data.image_size=256 data.num_samples=8192 autoencoder.name=kl autoencoder.path=/tmp/sdvae autoencoder.dtype=bfloat16 data.cache=/tmp/cache256"
SECONDS=0
timeout 120 python3 -m ldmkit.cli encode configs/quickstart.yaml $COMMON data.num_workers=14 --batch-size 128 \
    --no-progress 2>&1 | tail -2 | tee "$OUT/encode.txt"
echo "encode wall s: $SECONDS" | tee -a "$OUT/encode.txt"
timeout 150 python3 -m ldmkit.cli train configs/quickstart.yaml $COMMON run.dir=/tmp/run256 model.name=dit-b/2 \
    model.depth=null model.hidden_size=null model.num_heads=null train.batch_size=256 train.steps=120 \
    train.precision=bf16 train.compile=true train.log_every=20 train.sample_every=0 train.checkpoint_every=1000 \
    data.num_workers=4 eval.shapes_at_end=false sample.steps=4 sample.grid_rows=1 --no-progress 2>&1 \
    | tail -4 | tee "$OUT/train.txt"
grep '"loss"' /tmp/run256/metrics.jsonl | tail -3 | tee -a "$OUT/train.txt"
