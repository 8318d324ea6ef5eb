#!/usr/bin/env bash
# The speed issue's GPU measurements in one call (at most 8 minutes), for a session lent a GPU
# machine: the CUDA tests of the speed-ups (CUDA-graph clustering, the Triton kernel against
# scipy, the device threads), the JPEG decode rate of the loader threads and of nvjpeg, the
# clustering alone (Triton, torch and scipy; batches of 16, and of 32 with 8 rounds per host
# read), then ViT-L/16 at 1024 px in bfloat16 (batches of 16 against the per-pair baseline,
# batches of 32 without it with the default clustering, Triton, and with torch's) and ViT-S/16 at
# 512 px end to end, and last the peak memory of ViT-L/16 at 512 to 2048 px. Run in the
# repository root:
#
#     bash benchmarks/gpu_check.sh [LOG_FOLDER]      # default: $OUT, else /tmp/insid3-gpu
#
# Wheels in .whl/ (ignored by git; name it in the device tool's carry) are installed first, for a
# machine whose packages are older than the engine's: its timm may predate DINOv3. Fetch them
# beforehand, without device time:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl timm==1.0.31
#
# Each step has its own time limit and prints its exit status, so one failing step leaves
# the others' numbers; the whole output is kept in LOG_FOLDER/gpu_check.log.
set -uo pipefail
log_folder=${1:-${OUT:-/tmp/insid3-gpu}}
mkdir -p "$log_folder"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {  # step SECONDS ARGS...: the limits add up to 465 s, under the 8 minutes of the check
    local limit=$1
    shift
    echo "+ $* (at most $limit s)"
    timeout "$limit" "$python" "$@"
    echo "exit status $?"
}

{
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/insid3-site .whl/*.whl && export PYTHONPATH=/tmp/insid3-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
    step 60 -m pytest -q -p no:cacheprovider tests/engine/test_speed.py tests/engine/test_parity.py -k "cuda or clustering"
    step 45 -m pytest -q -p no:cacheprovider tests/steps/test_triton_clustering.py -m "not slow"
    step 30 benchmarks/decode.py --images 192 --workers 2 4 8 --image-size 1024
    step 40 benchmarks/clustering.py --device cuda --random-weights --backbone vit_small_patch16_dinov3 \
        --image-size 1024 --targets 32 --batch-size 16
    step 40 benchmarks/clustering.py --device cuda --random-weights --backbone vit_small_patch16_dinov3 \
        --image-size 1024 --targets 32 --batch-size 32 --rounds-per-check 8
    step 60 benchmarks/throughput.py --device cuda --backbone vit_large_patch16_dinov3 --random-weights \
        --image-size 1024 --targets 32 --shots 1 --batch-size 16 --precision bfloat16
    step 45 benchmarks/throughput.py --device cuda --backbone vit_large_patch16_dinov3 --random-weights \
        --image-size 1024 --targets 192 --shots 1 --batch-size 32 --precision bfloat16 --skip-baseline
    step 45 benchmarks/throughput.py --device cuda --backbone vit_large_patch16_dinov3 --random-weights \
        --image-size 1024 --targets 192 --shots 1 --batch-size 32 --precision bfloat16 --skip-baseline \
        --clustering torch
    step 40 benchmarks/throughput.py --device cuda --backbone vit_small_patch16_dinov3 --random-weights \
        --image-size 512 --targets 96 --shots 1 --batch-size 16
    step 60 benchmarks/memory.py --device cuda --backbone vit_large_patch16_dinov3 --sizes 512 1024 1536 2048
} 2>&1 | tee "$log_folder/gpu_check.log"
